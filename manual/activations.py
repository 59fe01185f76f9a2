"""Activation functions of the document's figure, each a forward/backward pair.

Shapes: any; dy has the shape of y.  Maxout takes z (N, H·K) and returns (N, H): unit h is the
max over the K consecutive pieces z[:, h·K:(h+1)·K] (each piece has its own weights and bias in
the preceding linear layer).

Conventions at kinks, matching PyTorch: ReLU'(0) = 0, LeakyReLU'(0) = slope, ELU'(0) = alpha
(x = 0 takes the negative branch), Maxout ties route the whole gradient to the first maximal piece
(as ``max(dim)`` does).
"""
import torch
import torch.nn.functional as F

from manual.kernel_exp import kernel_exp


# --- sigmoid ---------------------------------------------------------------------------------
def sigmoid_forward(x):
    y = torch.sigmoid(x)
    return y, y


def sigmoid_backward(dy, y):
    # σ'(x) = σ(x)(1 − σ(x)):  dx = dy·(1 − y)·y, evaluated left to right as sigmoid_backward does.
    return dy * (1 - y) * y


# --- tanh ------------------------------------------------------------------------------------
def tanh_forward(x):
    y = torch.tanh(x)
    return y, y


def tanh_backward(dy, y):
    # tanh'(x) = 1 − tanh²(x):  dx = dy·(1 − y²).  The CPU kernel's `1 - b*b` is contracted by the
    # compiler into one FMA, so (1 − y²) is formed by a fused addcmul (one rounding), not y*y then 1−.
    return dy * torch.addcmul(torch.ones_like(y), y, y, value=-1)


# --- ReLU ------------------------------------------------------------------------------------
def relu_forward(x):
    y = torch.relu(x)
    return y, y


def relu_backward(dy, y):
    # relu'(x) = 1 if x > 0 else 0 (0 at the kink).  threshold_backward: y <= 0 ? +0 : dy —
    # a select, not dy·mask, so a negative dy gives +0 (not −0) and an infinite dy no NaN.
    return torch.where(y <= 0, 0.0, dy)


# --- Leaky ReLU ------------------------------------------------------------------------------
def leaky_relu_forward(x, slope=0.1):
    y = F.leaky_relu(x, slope)
    return y, (x, slope)


def leaky_relu_backward(dy, cache):
    # leaky'(x) = 1 if x > 0 else slope (x = 0 and NaN take the slope side).
    x, slope = cache
    return torch.where(x > 0, dy, dy * slope)


# --- ELU -------------------------------------------------------------------------------------
def elu_forward(x, alpha=1.0):
    y = F.elu(x, alpha)
    return y, (x, alpha)


def elu_backward(dy, cache):
    """dy, x: same shape -> dx.

    elu'(x) = 1 if x > 0 else α·eˣ (x = 0 takes the α·eˣ side, as elu_backward does).  The kernel
    (is_result=False, what nn.ELU's autograd runs) evaluates ((dy·1)·α)·eˣ with its own eˣ:
    SLEEF in vector lanes, std::exp in the scalar tail (manual/kernel_exp.py mirrors both; the
    tail is ≤ 1 ulp from glibc on rare values).  NaN x: the vector lambda takes the α·eˣ side
    (NaN), the scalar one and CUDA take dy.  ``dy*(y + α)`` (the in-place, is_result form) is not
    what nn.ELU evaluates and loses all relative accuracy for x < −17 in float32.
    """
    # elu'(x) = 1 if x > 0 else α·eˣ:  dx = dy (x > 0) or ((dy·1)·α)·eˣ (x ≤ 0)
    x, alpha = cache
    e, lanes = kernel_exp(x)
    negative = x <= 0
    if lanes is not None:
        negative = negative | (torch.isnan(x) & lanes)
    return torch.where(negative, dy * alpha * e, dy)


# --- identity --------------------------------------------------------------------------------
def identity_forward(x):
    return x, None


def identity_backward(dy, cache):
    # d/dx x = 1
    return dy


# --- Maxout ----------------------------------------------------------------------------------
def maxout_forward(z, k=2):
    """z: (N, H·K) -> y (N, H) = max over each group of K consecutive pieces."""
    n, width = z.shape
    if width % k:
        raise ValueError(f"z: expected a width divisible by k={k}, got shape {list(z.shape)}")
    y, idx = z.view(n, width // k, k).max(2)
    return y, (z.shape, idx)


def maxout_backward(dy, cache):
    # ∂max/∂z_j = 1 for the selected piece j (first maximal one), 0 elsewhere: scatter dy there.
    shape, idx = cache
    n, width = shape
    dz = torch.zeros((n, idx.shape[1], width // idx.shape[1]), dtype=dy.dtype, device=dy.device)
    return dz.scatter_(2, idx.unsqueeze(2), dy.unsqueeze(2)).view(n, width)


# name -> (forward, backward, option names)
ACTIVATIONS = {
    "sigmoid": (sigmoid_forward, sigmoid_backward, ()),
    "tanh": (tanh_forward, tanh_backward, ()),
    "relu": (relu_forward, relu_backward, ()),
    "leaky_relu": (leaky_relu_forward, leaky_relu_backward, ("slope",)),
    "elu": (elu_forward, elu_backward, ("alpha",)),
    "maxout": (maxout_forward, maxout_backward, ("k",)),
    "identity": (identity_forward, identity_backward, ()),
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


def activation_backward(name, dy, cache):
    return _lookup(name)[1](dy, cache)
