"""Fully connected (affine) layer, parameters in nn.Linear layout.

Shapes: x (N, D), weight (H, D), bias (H,) or None, out (N, H).
"""
import torch

from manual import _check


def linear_forward(x, weight, bias=None):
    """out = x·Wᵀ + b.

    x: (N, D); weight: (H, D); bias: (H,) or None.  Returns out (N, H) and the cache.
    With a bias this is one ``addmm`` (bias accumulated inside the GEMM, as F.linear does on
    CPU); ``x.mm(W.t()) + b`` would round differently once the GEMM blocks over D.
    """
    _check.tensor("x", x, ndim=2)
    _check.tensor("weight", weight, ndim=2)
    _check.same("x", x, "weight", weight)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x: expected shape [N, {weight.shape[1]}] to match weight "
                         f"{list(weight.shape)}, got {list(x.shape)}")
    if bias is not None:
        _check.tensor("bias", bias, ndim=1)
        _check.same("weight", weight, "bias", bias)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape [{weight.shape[0]}], got {list(bias.shape)}")
        out = torch.addmm(bias, x, weight.t())
    else:
        out = x.mm(weight.t())
    return out, (x, weight, bias is not None)


def _column_major(t):
    # The stride test of FunctionsManual.cpp mm_mat{1,2}_backward.
    return t.stride(0) == 1 and t.stride(1) == t.size(0)


def linear_backward(dout, cache):
    """dout: (N, H) -> (dx (N, D), dweight (H, D), dbias (H,) or None).

    out = x·Wᵀ + b  ⇒  dx = dout·W,  dW = doutᵀ·x,  db = Σₙ dout.
    Operand order mirrors autograd: mm_mat1_backward gives ``dout.mm(W)`` (or, for a column-major
    x, ``W.t().mm(dout.t()).t()``); Wᵀ is column-major so mm_mat2_backward gives
    ``(doutᵀ·x)ᵀ`` for Wᵀ and TBackward turns it into ``dout.t().mm(x)``; the engine reduces the
    broadcast bias gradient with ``sum(0)``.  ``x.t().mm(dout).t()`` is the same math but different
    bits.
    """
    # out = x·Wᵀ + b  ⇒  dx = dout·W,  dW = doutᵀ·x,  db = Σₙ dout
    x, weight, has_bias = cache
    if dout.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(f"dout: expected shape {[x.shape[0], weight.shape[0]]}, "
                         f"got {list(dout.shape)}")
    if _column_major(x):
        dx = weight.t().mm(dout.t()).t()
    else:
        dx = dout.mm(weight)
    wt = weight.t()
    if _column_major(wt):
        dweight = dout.t().mm(x)
    else:  # weight stored transposed: the general branch, x.t()·dout, then TBackward
        dweight = x.t().mm(dout).t()
    dbias = dout.sum(0) if has_bias else None
    return dx, dweight, dbias
