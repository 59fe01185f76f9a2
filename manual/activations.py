"""Activation functions of the document's figure, and today's GELU (erf and tanh forms) and SiLU,
each a forward/backward pair.

Shapes: any; dout and dx have the shape of y and x.  Maxout takes z (N, H·K) and returns (N, H): unit h is the
max over the K consecutive pieces z[:, h·K:(h+1)·K] (each piece has its own weights and bias in
the preceding linear layer).

Conventions at kinks, matching PyTorch: ReLU'(0) = 0, LeakyReLU'(0) = slope, ELU'(0) = alpha
(x = 0 takes the negative branch), Maxout ties route the whole gradient to the first maximal piece
(as ``max(dim)`` does).

ELU, GELU and SiLU evaluate their exp / erf / tanh as the CPU kernel autograd runs does, position by
position (vector lanes and scalar tail): manual/kernel_exp.py, kernel_erf.py, kernel_tanh.py.
"""
import math

import torch
import torch.nn.functional as F

from manual import double_word as dw, kernel_erf
from manual.kernel_exp import kernel_exp
from manual.kernel_tanh import kernel_tanh
from manual.libm_tail import patch_tail


# --- sigmoid ---------------------------------------------------------------------------------
def sigmoid_forward(x):
    y = torch.sigmoid(x)
    return y, y


def sigmoid_backward(dout, y):
    # σ'(x) = σ(x)(1 − σ(x)):  dx = dout·(1 − y)·y
    dx = dout * (1 - y) * y  # Bits: left to right, as aten's sigmoid_backward
    return dx


# --- tanh ------------------------------------------------------------------------------------
def tanh_forward(x):
    y = torch.tanh(x)
    return y, y


def tanh_backward(dout, y):
    # tanh'(x) = 1 − tanh²(x):  dx = dout·(1 − y²)
    dx = dout * torch.addcmul(torch.ones_like(y), y, y, value=-1)
    # Bits: the CPU kernel's `1 - b*b` is contracted by the compiler into one FMA, so (1 − y²) is
    # one fused addcmul (one rounding), not y*y then 1 −.
    return dx


# --- ReLU ------------------------------------------------------------------------------------
def relu_forward(x):
    y = torch.relu(x)
    return y, y


def relu_backward(dout, y):
    # relu'(x) = 1 if x > 0 else 0 (0 at the kink):  dx = dout where y > 0, else 0
    dx = torch.where(y <= 0, 0.0, dout)
    # Bits: threshold_backward is a select (y <= 0 ? +0 : dout), not dout·mask, so a negative dout
    # gives +0 (not −0) and an infinite dout no NaN.
    return dx


# --- Leaky ReLU ------------------------------------------------------------------------------
def leaky_relu_forward(x, slope=0.1):
    y = F.leaky_relu(x, slope)
    return y, (x, slope)


def leaky_relu_backward(dout, cache):
    # leaky'(x) = 1 if x > 0 else slope (x = 0 and NaN take the slope side)
    x, slope = cache
    dx = torch.where(x > 0, dout, dout * slope)
    return dx


# --- ELU -------------------------------------------------------------------------------------
def elu_forward(x, alpha=1.0):
    y = F.elu(x, alpha)
    return y, (x, alpha)


def elu_backward(dout, cache):
    """dout, x: same shape -> dx.  Bits: see the note below the function."""
    # elu'(x) = 1 if x > 0 else α·eˣ (x = 0 takes the α·eˣ side):  dx = dout or ((dout·1)·α)·eˣ
    x, alpha = cache
    e, lanes = kernel_exp(x)
    negative = x <= 0
    if lanes is not None:
        negative = negative | (torch.isnan(x) & lanes)
    dx = torch.where(negative, dout * alpha * e, dout)
    return dx
# Bits: the kernel nn.ELU's autograd runs (elu_backward, is_result=False) evaluates ((dout·1)·α)·eˣ
# with its own eˣ: SLEEF in vector lanes, std::exp in the scalar tail (manual/kernel_exp.py
# mirrors both; the tail is ≤ 1 ulp from glibc on rare values).  NaN x: the vector lambda takes
# the α·eˣ side (NaN), the scalar one and CUDA take dout.  ``dout·(y + α)`` (the in-place,
# is_result form) is not what nn.ELU evaluates and loses all relative accuracy for x < −17 in
# float32.


# --- GELU (erf) -----------------------------------------------------------------------------
def gelu_forward(x):
    y = F.gelu(x)
    return y, x


def gelu_backward(dout, x):
    """dout, x: same shape -> dx.  Bits: manual/kernel_erf.py (which kernel, and its erf/exp)."""
    # gelu'(x) = Φ(x) + x·φ(x) = 0.5·(1 + erf(x/√2)) + x·e^(−x²/2)/√(2π):  dx = dout·gelu'(x)
    if kernel_erf.uses_onednn(x):
        return kernel_erf.onednn_gelu_grad(x) * dout
    e, lanes = kernel_exp(x * x * -0.5)
    xa = x * kernel_erf.ALPHA
    erf = torch.erf(xa)
    if lanes is not None:
        vec_erf = kernel_erf.sleef_erf if x.dtype == torch.float64 else kernel_erf.vec_erf_f32
        erf = patch_tail(torch.where(lanes, vec_erf(xa), erf), xa, lanes, "erf")
    cdf = 0.5 * (1 + erf)
    pdf = kernel_erf.BETA * e
    grad = cdf + x * pdf                                  # the scalar tail: two roundings
    if lanes is not None:                                 # vector lanes: contracted into one FMA
        grad = torch.where(lanes, dw.fma(x, pdf, cdf), grad)
    return dout * grad


# --- GELU (tanh approximation) ---------------------------------------------------------------
_GELU_TANH_BETA = math.sqrt(2) * (2 / math.sqrt(math.pi)) * 0.5   # √(2/π)
_GELU_TANH_KAPPA = 0.044715


def gelu_tanh_forward(x):
    y = F.gelu(x, approximate="tanh")
    return y, x


def gelu_tanh_backward(dout, x):
    """dout, x: same shape -> dx.  Bits: see the note below the function."""
    # u = β(x + κx³), t = tanh u:  gelu' = 0.5·(1 + t) + 0.5x·(1 − t²)·β(1 + 3κx²)
    beta = torch.tensor(_GELU_TANH_BETA, dtype=x.dtype, device=x.device)
    kappa = torch.tensor(_GELU_TANH_KAPPA, dtype=x.dtype, device=x.device)
    inner = beta * dw.fma(kappa, x * x * x, x)
    t, _ = kernel_tanh(inner)
    left_derivative = 0.5 * (1 + t)
    tanh_derivative = dw.fnma(t, t, torch.ones_like(t))
    inner_derivative = beta * dw.fma(3 * kappa, x * x, torch.ones_like(x))
    return dout * (left_derivative + 0.5 * x * tanh_derivative * inner_derivative)
# Bits: the order of GeluBackwardKernelImpl (tanh branch); GCC contracts x + κ·x³, 1 − t·t and
# 1 + 3κ·x² into FMAs (measured: the other candidates are not contracted); its tanh is SLEEF's in
# vector lanes and glibc's in the scalar tail (manual/kernel_tanh.py).


# --- SiLU ------------------------------------------------------------------------------------
def silu_forward(x):
    y = F.silu(x)
    return y, x


def silu_backward(dout, x):
    """dout, x: same shape -> dx.  Bits: see the note below the function."""
    # σ = 1/(1 + e^−x), silu'(x) = σ·(1 + x·(1 − σ)):  dx = (dout·σ)·(1 + x·(1 − σ))
    e, _ = kernel_exp(-x)
    sigmoid = 1 / (1 + e)
    return dout * sigmoid * dw.fma(x, 1 - sigmoid, torch.ones_like(x))
# Bits: silu_backward's kernel (run by autograd with grad mode off) evaluates e^−x with SLEEF in
# vector lanes and std::exp in the scalar tail (manual/kernel_exp.py mirrors both); GCC contracts
# 1 + x·(1 − σ) into one FMA.


# --- identity --------------------------------------------------------------------------------
def identity_forward(x):
    return x, None


def identity_backward(dout, cache):
    # d/dx x = 1:  dx = dout
    return dout


# --- Maxout ----------------------------------------------------------------------------------
def maxout_forward(z, k=2):
    """z: (N, H·K) -> y (N, H) = max over each group of K consecutive pieces."""
    n, width = z.shape
    if width % k:
        raise ValueError(f"z: expected a width divisible by k={k}, got shape {list(z.shape)}")
    y, idx = z.view(n, width // k, k).max(2)
    return y, (z.shape, idx)


def maxout_backward(dout, cache):
    """dout (N, H) -> dz (N, H·K)."""
    # ∂max/∂z_j = 1 for the selected piece j (first maximal one), 0 elsewhere: scatter dout there
    shape, idx = cache
    n, width = shape
    dz = torch.zeros((n, idx.shape[1], width // idx.shape[1]), dtype=dout.dtype, device=dout.device)
    return dz.scatter_(2, idx.unsqueeze(2), dout.unsqueeze(2)).view(n, width)


# name -> (forward, backward, option names)
ACTIVATIONS = {
    "sigmoid": (sigmoid_forward, sigmoid_backward, ()),
    "tanh": (tanh_forward, tanh_backward, ()),
    "relu": (relu_forward, relu_backward, ()),
    "leaky_relu": (leaky_relu_forward, leaky_relu_backward, ("slope",)),
    "elu": (elu_forward, elu_backward, ("alpha",)),
    "maxout": (maxout_forward, maxout_backward, ("k",)),
    "identity": (identity_forward, identity_backward, ()),
    "gelu": (gelu_forward, gelu_backward, ()),
    "gelu_tanh": (gelu_tanh_forward, gelu_tanh_backward, ()),
    "silu": (silu_forward, silu_backward, ()),
}


def _lookup(name):
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation: unknown name {name!r}; expected one of "
                         f"{', '.join(ACTIVATIONS)}") from None


def activation_forward(name, x, **options):
    """Apply activation ``name`` to x; options: slope (leaky_relu), alpha (elu), k (maxout)."""
    fwd, _, allowed = _lookup(name)
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(f"activation options: {sorted(unknown)} not accepted by {name!r}")
    return fwd(x, **options)


def activation_backward(name, dout, cache):
    """dout (shape of the activation's output) -> dx (shape of its input)."""
    return _lookup(name)[1](dout, cache)


def activation_list(activation, n_hidden):
    """One activation name per hidden layer, from a single name or a list of n_hidden names."""
    acts = [activation] * n_hidden if isinstance(activation, str) else activation
    if not isinstance(acts, (list, tuple)) or len(acts) != n_hidden:
        raise ValueError(f"activation: expected one name or a list of {n_hidden} (one per hidden "
                         f"layer), got {activation!r}")
    for a in acts:
        _lookup(a)
    return list(acts)
