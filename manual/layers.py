"""Fully connected (affine) layer, parameters in nn.Linear layout.

Shapes: x (N, D), weight (H, D), bias (H,) or None, out (N, H).
"""
import torch

from manual import _check


def linear_forward(x, weight, bias=None):
    """out = x·Wᵀ + b.  x (N, D), weight (H, D), bias (H,) or None -> out (N, H), cache.

    Bits: with a bias this is one ``addmm`` (the bias accumulated inside the GEMM, as F.linear
    does on CPU); ``x.mm(W.t()) + b`` would round differently once the GEMM blocks over D.
    """
    _check.linear_args(x, weight, bias)
    if bias is None:
        out = x.mm(weight.t())
    else:
        out = torch.addmm(bias, x, weight.t())
    return out, (x, weight, bias is not None)


def linear_backward(dout, cache):
    """dout (N, H) -> dx (N, D), dweight (H, D), dbias (H,) or None.

    Bits: the operand order is autograd's.  mm_mat1_backward gives ``dout.mm(W)`` (or, for a
    column-major x, ``W.t().mm(dout.t()).t()``); Wᵀ is column-major, so mm_mat2_backward gives
    ``(doutᵀ·x)ᵀ`` for Wᵀ and TBackward turns it into ``dout.t().mm(x)``; the engine reduces the
    broadcast bias gradient with ``sum(0)``.  ``x.t().mm(dout).t()`` is the same math, other bits.
    """
    # out = x·Wᵀ + b  ⇒  dx = dout·W,  dW = doutᵀ·x,  db = Σₙ dout
    x, weight, _ = cache
    dweight, dbias = linear_param_grads(dout, cache)
    dx = weight.t().mm(dout.t()).t() if column_major(x) else dout.mm(weight)
    return dx, dweight, dbias


def linear_param_grads(dout, cache):
    """linear_backward without dx (a first layer's input gradient, which a step never uses):
    (dweight, dbias or None), the same ops."""
    x, weight, has_bias = cache
    _check.linear_dout(dout, x, weight)
    if column_major(weight.t()):
        dweight = dout.t().mm(x)
    else:  # weight stored transposed: the general branch, x.t()·dout, then TBackward
        dweight = x.t().mm(dout).t()
    dbias = dout.sum(0) if has_bias else None
    return dweight, dbias


def column_major(t):
    # The stride test of FunctionsManual.cpp mm_mat{1,2}_backward.
    return t.stride(0) == 1 and t.stride(1) == t.size(0)
