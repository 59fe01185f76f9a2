"""Section 4: the six activations of the figure — sigmoid, tanh, ReLU, Leaky ReLU (0.1), Maxout,
ELU — and today's GELU (erf and tanh forms) and SiLU, forward and backward by hand, against the
stock nn modules, on a grid with the kinks, saturation, overflow (|x| up to 1e4), NaN and ±Inf
(and a 27-element grid whose elements mostly fall in the CPU kernels' scalar tail); then inside
an MLP; then finite differences."""
import math

import torch

from manual.activations import activation_backward, activation_forward
from refnet import data as datasets, not_bitwise
from refnet.compare import Check
from refnet.examples import register
from refnet.examples._common import doc_check, fd_check, twin_check
from refnet.harness import build_pair, gradient_checks
from refnet.spec import Spec
from refnet.twin import activation_module

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "maxout", "elu", "gelu", "gelu_tanh", "silu")
SLOPE, ALPHA, K = 0.1, 1.0, 3
OPTIONS = {"leaky_relu": {"slope": SLOPE}, "elu": {"alpha": ALPHA}, "maxout": {"k": K}}
# the document's (and PyTorch's) derivatives at the kink x = 0, for an upstream gradient of 1
KINK_DOC = {"relu": 0.0, "leaky_relu": SLOPE, "elu": ALPHA}
SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 1.0, -1.0, 5.0, -5.0, 17.0, -17.0, 20.0, -20.0,
           88.0, -88.0, 104.0, -104.0, 710.0, -710.0, 1e3, -1e3, 1e4, -1e4,
           math.nan, math.inf, -math.inf]
GRID_SHAPE = (37, 29)          # 1073 elements: not a multiple of any vector width (tails covered)
MLP_SIZES = [7, 13, 11, 3]
MLP_N = 37                     # 37·13 = 481 elements per hidden activation: a scalar tail too
NOTES = {
    "maxout": "Maxout (k=3) uses max(dim): a tie routes the whole gradient to the first maximal "
              "piece; the grid has ties",
    "elu": "ELU's eˣ mirrors the kernel's (SLEEF in vector lanes, std::exp in the scalar tail; "
           "manual/kernel_exp.py)",
    "tanh": "tanh: (1 − y²) as one fused addcmul, as the kernel's contracted FMA",
    "gelu": "GELU (erf): float32 mirrors oneDNN's gelu_erf backward, float64 ATen's kernel with "
            "SLEEF's erf and exp in vector lanes and glibc's in the scalar tail "
            "(manual/kernel_erf.py)",
    "gelu_tanh": "GELU (tanh): SLEEF's tanh in vector lanes, glibc's tanh/tanhf in the scalar tail "
                 "(manual/kernel_tanh.py, manual/glibc_float.py)",
    "silu": "SiLU: e^−x as the kernel's (SLEEF in vector lanes, glibc in the scalar tail); "
            "1 + x·(1 − σ) as one FMA",
}
TAIL_SHAPE = (3, 9)            # 27 elements: 11 of 27 float32 / 3 of 27 float64 in the AVX2 tail


def grid(dtype, device, seed=0):
    """GRID_SHAPE values: the special points first, then seeded normals of growing scale."""
    gen = torch.Generator().manual_seed(seed)
    n = GRID_SHAPE[0] * GRID_SHAPE[1]
    base = torch.randn(n, generator=gen, dtype=torch.float64)
    base *= torch.logspace(-2, 2, n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
    base[:len(SPECIAL)] = torch.tensor(SPECIAL, dtype=torch.float64)
    x = base.view(GRID_SHAPE).to(dtype)
    # Maxout ties: make the three pieces of a few groups equal (after the dtype cast)
    x[-3:, :K * 4] = x[-3:, :1]
    return x.to(device)


def upstream(shape, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def _maxout_input(x):
    # (37, 29) -> (37, 27): a width divisible by K
    return x[:, :(x.shape[1] // K) * K].contiguous()


def manual_pair(name, x, dy):
    y, cache = activation_forward(name, x, **OPTIONS.get(name, {}))
    return y, activation_backward(name, dy, cache)


def twin_pair(name, x, dy):
    module = activation_module(name, slope=SLOPE, alpha=ALPHA, k=K)
    xt = x.detach().clone().requires_grad_()
    y = module(xt)
    y.backward(dy)
    return y.detach(), xt.grad


def _mlp_spec(name, ctx):
    return Spec(sizes=MLP_SIZES, activation=name, bias=True, loss="mse", steps=1, data="random",
                n_samples=MLP_N, dtype=ctx.dtype_name, device=ctx.device, seed=3, slope=SLOPE,
                alpha=ALPHA, k=2, name=f"mlp_{name}")


@register("activations", "sigmoid, tanh, ReLU, Leaky ReLU, Maxout, ELU, GELU, GELU (tanh), SiLU: "
                        "grid, MLP, FD", "4")
def run(ctx):
    checks = []
    for name in ACTIVATIONS:
        # the expected tier: bitwise unless refnet.not_bitwise's table lists the op (ELU: its bound)
        keys = {f"activation:{name}"}
        full = grid(ctx.dtype, ctx.device)
        for label, x in (("grid", full), ("tail", full.reshape(-1)[:27].reshape(TAIL_SHAPE))):
            checks.append(_grid_check(name, label, x, ctx, keys))
        # the same activation inside a [7, 13, 11, 3] MLP with biases
        spec = _mlp_spec(name, ctx)
        xs, ys = datasets.random(n=MLP_N, d_in=MLP_SIZES[0], d_out=MLP_SIZES[-1], seed=4,
                                 dtype=ctx.dtype, device=ctx.device)
        checks.append(Check(f"{name}.mlp", gradient_checks(build_pair(spec), xs, ys,
                                                           ctx.strict_bits),
                            expected=not_bitwise.expected_for(keys, ctx.device, "grad")))
        if name in KINK_DOC:
            zero = torch.zeros(1, dtype=ctx.dtype, device=ctx.device)
            _, d0 = manual_pair(name, zero, torch.ones_like(zero))
            checks.append(doc_check(f"{name}.kink", {"d/dx at 0": d0},
                                    {"d/dx at 0": ([KINK_DOC[name]], 0.0)}))
        if ctx.dtype == torch.float64:
            checks.append(_fd(name, ctx))
    return checks


def _grid_check(name, label, x, ctx, keys):
    """Manual vs the nn module on grid x: forward and backward, bit for bit (or the table's tier)."""
    if name == "maxout":
        x = _maxout_input(x)
    out_shape = (x.shape[0], x.shape[1] // K) if name == "maxout" else x.shape
    dy = upstream(out_shape, ctx.dtype, ctx.device)
    ym, dxm = manual_pair(name, x, dy)
    yt, dxt = twin_pair(name, x, dy)
    return twin_check(f"{name}.{label}", {"forward": ym, "backward": dxm},
                      {"forward": yt, "backward": dxt}, ctx, note=NOTES.get(name, ""),
                      expected=not_bitwise.expected_for(keys, ctx.device, "op"))


def _fd(name, ctx):
    """Finite differences at smooth points (away from the kinks and from ties)."""
    pts = torch.linspace(-3.0, 3.0, 24, dtype=torch.float64) + 0.0371
    if name == "maxout":
        x = pts.view(4, 6)[:, :K * 2].contiguous()   # distinct pieces in every group
    else:
        x = pts.view(4, 6)
    x = x.to(ctx.device)
    out_shape = (x.shape[0], x.shape[1] // K) if name == "maxout" else x.shape
    dy = upstream(out_shape, torch.float64, ctx.device, seed=2)
    _, dx = manual_pair(name, x, dy)
    return fd_check(f"{name}.fd", lambda x: activation_forward(name, x, **OPTIONS.get(name, {}))[0] * dy,
                    {"x": x.clone()}, {"x": dx})
