"""Section 5: fully connected networks of any depth (ReLU, biases), and why depth needs a
nonlinearity: stacked linear layers collapse into one linear map."""
import torch

from refnet import data as datasets
from refnet.compare import Check, compare_tensors
from refnet.examples import Context, register
from refnet.examples._common import claim_check, fd_check, sample_indices
from refnet.fixtures import EXPORT_STEPS, case_for_spec
from refnet.harness import build_pair, curve_checks, gradient_checks
from refnet.spec import Spec

DEEP_SIZES = {"3_layers": [6, 10, 8, 3], "5_layers": [6, 12, 10, 9, 7, 3]}
DEEP_N, DEEP_STEPS = 21, 30
FD_SAMPLES = 6                      # sampled entries per parameter tensor (float64)
COLLAPSE_SIZES = [5, 9, 3, 4]       # three linear layers, no activation, a 3-wide bottleneck
COLLAPSE_N = 11


def _spec(name, sizes, ctx, activation="relu"):
    return Spec(sizes=sizes, activation=activation, bias=True, loss="sum_squared",
                optimizer={"name": "sgd", "lr": 0.01}, steps=DEEP_STEPS, data="random",
                n_samples=DEEP_N, dtype=ctx.dtype_name, device=ctx.device, seed=5, name=name)


def _export_case(dtype="float64", steps=None):
    """refnet export: the 3-layer ReLU net with biases, a short training run (golden fixtures)."""
    ctx = Context(device="cpu", dtype=torch.float32 if dtype == "float32" else torch.float64)
    sizes = DEEP_SIZES["3_layers"]
    steps = EXPORT_STEPS if steps is None else steps
    spec = Spec.from_dict({**_spec("deep_fc_3_layers", sizes, ctx).to_dict(), "steps": steps})
    x, y = datasets.random(n=DEEP_N, d_in=sizes[0], d_out=sizes[-1], seed=6, dtype=ctx.dtype)
    return case_for_spec(spec, data=(x, y), note=f"3 layers, training run cut to {steps} steps")


@register("deep_fc", "f = W3·max(0, W2·max(0, W1x + b1) + b2) + b3 …: 3 and 5 layers", "5",
          case=_export_case)
def run_deep_fc(ctx):
    checks = []
    for label, sizes in DEEP_SIZES.items():
        spec = _spec(label, sizes, ctx)
        x, y = datasets.random(n=DEEP_N, d_in=sizes[0], d_out=sizes[-1], seed=6, dtype=ctx.dtype,
                               device=ctx.device)
        pair = build_pair(spec)
        checks.append(Check(f"{label}.grad", gradient_checks(pair, x, y, ctx.strict_bits)))
        verdicts, _ = curve_checks(build_pair(spec), x, y, DEEP_STEPS, strict_bits=ctx.strict_bits)
        checks.append(Check(f"{label}.loss_curve[{DEEP_STEPS}]", verdicts[:1]))
        checks.append(Check(f"{label}.final_params", verdicts[1:]))
        if ctx.dtype == torch.float64:
            checks.append(_fd(label, pair, x, y))
    return checks


def _fd(label, pair, x, y):
    mlp = pair.mlp
    _, cache = mlp.forward(x, y)
    grads, _ = mlp.backward(cache)
    inputs = {name: p for name, p in mlp.params.items()}   # perturbed in place, restored
    idx = {name: sample_indices(p.numel(), FD_SAMPLES, seed=i) for i, (name, p) in
           enumerate(inputs.items())}
    note = f"{FD_SAMPLES} sampled entries per tensor (none lands on a ReLU kink at this init)"
    return fd_check(f"{label}.fd", lambda **_: mlp.forward(x, y)[0], inputs, grads, idx, note)


def collapse(params):
    """Stacked linear layers -> one (W, b): W = W3·W2·W1, b = W3·(W2·b1 + b2) + b3."""
    W = params["layers.0.weight"]
    b = params["layers.0.bias"]
    i = 1
    while f"layers.{i}.weight" in params:
        Wi, bi = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
        W, b = Wi.mm(W), Wi.mv(b) + bi
        i += 1
    return W, b


@register("linear_collapse", "W2(W1x + b1) + b2 = (W2W1)x + (W2b1 + b2): depth without "
          "nonlinearity is one linear map", "5")
def run_linear_collapse(ctx):
    spec = Spec(sizes=COLLAPSE_SIZES, activation="identity", bias=True, loss="sum_squared",
                data="random", dtype=ctx.dtype_name, device=ctx.device, seed=7, name="collapse")
    x, y = datasets.random(n=COLLAPSE_N, d_in=COLLAPSE_SIZES[0], d_out=COLLAPSE_SIZES[-1], seed=8,
                           dtype=ctx.dtype, device=ctx.device)
    pair = build_pair(spec)
    stacked, _ = pair.mlp.predict(x)
    W, b = collapse(pair.mlp.params)
    one_map = torch.addmm(b, x, W.t())
    # the products associate differently, so the two agree to rounding, not to the bit
    v = compare_tensors("stacked vs one map", stacked, one_map, "forward", tier="tolerance")
    # the rank with a tolerance fit for W's dtype (a float32 product has float32 rounding: its
    # "zero" singular value is ~1e-9, not ~1e-18): singular values below max(shape)·eps(dtype)·σ₁
    rtol = max(W.shape) * torch.finfo(W.dtype).eps
    svals = torch.linalg.svdvals(W.double().cpu())
    rank = int((svals > rtol * svals[0]).sum())
    width = min(COLLAPSE_SIZES)
    return [Check("grad", gradient_checks(pair, x, y, ctx.strict_bits)),
            Check("collapse", [v], "stacked layers vs the collapsed linear map",
                  "three linear layers compute one affine map (to rounding)"),
            claim_check("collapse_rank", rank <= width,
                        f"collapsed W is {list(W.shape)} of rank {rank} (singular values above "
                        f"{rtol:.1e}·σ₁, the {ctx.dtype_name} tolerance) ≤ min width {width}",
                        {"rank": rank, "min_width": width,
                         "smallest_singular_value": float(svals[-1]), "rtol": rtol})]
