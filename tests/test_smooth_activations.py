"""GELU (erf), GELU (tanh) and SiLU: the manual backward bit for bit against autograd on CPU.

Sizes put elements in the kernels' vector lanes and in their scalar tails (all-tail sizes below
2·Vec::size(), mixed ones, a multiple of every vector width, and one above GRAIN_SIZE, where the
loop is split across threads); values include 0, ±0, tiny, the saturation ranges, ±1e4, ±Inf and
NaN.  Then inside an MLP (every gradient and a few training steps), and the routes that decide
the bits: oneDNN for float32 GELU, ATen's kernel with one element, and the C library's functions
mirrored for the scalar tail.
"""
import ctypes
import ctypes.util
import math

import pytest
import torch
import torch.nn.functional as F

from manual import activations as A
from manual import glibc_float, kernel_erf, kernel_tanh
from manual.kernel_exp import vector_lanes
from refnet.harness import build_pair, curve_checks, gradient_checks
from refnet import data as datasets
from refnet.spec import Spec

NAMES = ("gelu", "gelu_tanh", "silu")
TORCH = {"gelu": lambda x: F.gelu(x), "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
         "silu": F.silu}
SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 0.5, -0.5, 0.75, -0.75, 1.0, -1.0, 3.0, -3.0,
           5.0, -5.0, 9.0, -9.0, 10.0, -10.0, 20.0, -20.0, 88.0, -88.0, 104.0, -104.0, 710.0,
           -710.0, 1e4, -1e4, math.inf, -math.inf, math.nan]
SIZES = (1, 2, 7, 15, 16, 17, 33, 64, 1000, 1073, 40001)


def values(n, dtype, seed):
    """n values: the special points first (when they fit), then normals of scale 1e-3 … 30."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    x *= torch.logspace(-3, 1.5, n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
    k = min(n, len(SPECIAL))
    x[:k] = torch.tensor(SPECIAL[:k], dtype=torch.float64)[torch.randperm(k, generator=gen)]
    return x.to(dtype)


def autograd_grad(name, x, dy):
    xt = x.clone().requires_grad_()
    TORCH[name](xt).backward(dy)
    return xt.grad


def bitwise(a, b):
    """Same bits (NaN equal to NaN, whatever its payload; −0 and +0 differ)."""
    view = torch.int32 if a.dtype == torch.float32 else torch.int64
    return bool(((a.view(view) == b.view(view)) | (a.isnan() & b.isnan())).all())


def differing(a, b):
    view = torch.int32 if a.dtype == torch.float32 else torch.int64
    return int((~((a.view(view) == b.view(view)) | (a.isnan() & b.isnan()))).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward_bitwise_on_grids(name, dtype):
    fwd, bwd, _ = A.ACTIVATIONS[name]
    for n in SIZES:
        x = values(n, dtype, seed=n)
        dy = torch.randn(n, generator=torch.Generator().manual_seed(n + 1), dtype=dtype)
        y, cache = fwd(x)
        assert bitwise(y, TORCH[name](x)), (name, n)
        dx, want = bwd(dy, cache), autograd_grad(name, x, dy)
        assert differing(dx, want) == 0, (name, dtype, n, x[dx != want][:5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_scalar_tail_elements_are_bitwise(name, dtype):
    """1500 tensors of fewer elements than one vector step: every element goes through the
    kernel's scalar lambda (glibc's exp / erf / tanh), none through a vector lane."""
    n = 7 if dtype == torch.float64 else 15
    assert not vector_lanes(n, dtype).any()
    xs = (torch.randn(1500, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
          * 4).to(dtype)
    fwd, bwd, _ = A.ACTIVATIONS[name]
    got = torch.stack([bwd(torch.ones_like(x), fwd(x)[1]) for x in xs])
    want = torch.stack([autograd_grad(name, x, torch.ones_like(x)) for x in xs])
    assert differing(got, want) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_inside_an_mlp_every_gradient_and_training_is_bitwise(name, dtype):
    spec = Spec(sizes=[5, 13, 11, 3], activation=name, loss="mse", steps=5, data="random",
                n_samples=37, dtype=str(dtype).split(".")[1], seed=2, name=f"mlp_{name}",
                optimizer={"name": "adam", "lr": 0.01})
    pair = build_pair(spec)
    x, y = datasets.random(n=37, d_in=5, d_out=3, seed=4, dtype=dtype)
    verdicts = gradient_checks(pair, x, y, strict_bits=True) + \
        curve_checks(pair, x, y, steps=5, batch_size=16, strict_bits=True)[0]
    assert verdicts and all(v.tier == "bitwise" for v in verdicts), \
        [(v.name, v.tier) for v in verdicts if v.tier != "bitwise"]


def test_gelu_float32_follows_the_route_autograd_takes():
    """float32, contiguous, > 1 element: oneDNN's kernel (mirrored); one element, or oneDNN
    disabled: ATen's."""
    x = values(1000, torch.float32, seed=9)
    assert kernel_erf.uses_onednn(x) and not kernel_erf.uses_onednn(x[:1])
    assert not kernel_erf.uses_onednn(x.double())
    assert bitwise(kernel_erf.onednn_gelu_grad(x), autograd_grad("gelu", x, torch.ones_like(x)))
    # ATen's formula would not do on the oneDNN route (they differ on about half the values)
    e, _ = A.kernel_exp(x * x * -0.5)
    aten = 0.5 * (1 + torch.erf(x * kernel_erf.ALPHA)) + x * (kernel_erf.BETA * e)
    assert differing(aten, autograd_grad("gelu", x, torch.ones_like(x))) > 100
    with torch.backends.mkldnn.flags(enabled=False):       # ATen's kernel: its own float erf
        assert not kernel_erf.uses_onednn(x)
        assert bitwise(A.gelu_backward(torch.ones_like(x), x),
                       autograd_grad("gelu", x, torch.ones_like(x)))
    ones = torch.ones(1)
    for v in (0.3, -0.75, 2.5, -4.0, 7.0):
        one = torch.tensor([v])
        assert bitwise(A.gelu_backward(ones, one), autograd_grad("gelu", one, ones)), v


def test_sleef_mirrors_against_the_kernels_on_vector_lanes():
    """sleef_tanh and sleef_erf alone, through the activations that use them, at sizes that are a
    whole number of vector steps (no scalar tail at all)."""
    for dtype in (torch.float32, torch.float64):
        x = values(4096, dtype, seed=3)
        assert vector_lanes(4096, dtype).all()
        for name in ("gelu_tanh",) + (("gelu",) if dtype == torch.float64 else ()):
            dx = A.ACTIVATIONS[name][1](torch.ones_like(x), x)
            assert differing(dx, autograd_grad(name, x, torch.ones_like(x))) == 0, (name, dtype)
    for dtype in (torch.float32, torch.float64):     # and torch.tanh would not do: it is not SLEEF's
        x = values(4096, dtype, seed=4)
        assert differing(kernel_tanh.sleef_tanh(x), torch.tanh(x)) > 0


def _libm():
    path = ctypes.util.find_library("m")
    if path is None:
        pytest.skip("no C math library to compare with")
    lib = ctypes.CDLL(path)
    version = ctypes.CDLL(ctypes.util.find_library("c")).gnu_get_libc_version
    version.restype = ctypes.c_char_p
    return lib, tuple(int(p) for p in version().decode().split(".")[:2])


@pytest.mark.parametrize("fn", ["tanhf", "expf", "erff"])
def test_glibc_float_mirrors_agree_with_the_c_library(fn):
    """manual.glibc_float's tanhf / expf / erff give the C library's own results (glibc 2.27–2.40:
    its fdlibm tanhf and erff and its expf; 2.41 replaced tanhf and erff by CORE-MATH's)."""
    lib, version = _libm()
    if fn in ("tanhf", "erff") and version >= (2, 41):
        pytest.skip(f"glibc {version}: {fn} is CORE-MATH's, not the fdlibm one mirrored")
    cfn = getattr(lib, fn)
    cfn.restype, cfn.argtypes = ctypes.c_float, [ctypes.c_float]
    gen = torch.Generator().manual_seed(6)
    x = torch.cat([torch.randn(20000, generator=gen) * s for s in (0.01, 1.0, 8.0, 40.0)]
                  + [torch.tensor(SPECIAL, dtype=torch.float32)])
    want = torch.tensor([cfn(v) for v in x.tolist()], dtype=torch.float32)
    assert differing(getattr(glibc_float, fn)(x), want) == 0
