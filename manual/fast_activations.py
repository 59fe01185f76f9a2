"""FastMLP's activations: manual.activations' ACTIVATIONS table, with sigmoid, tanh and ReLU run in
place over the fast step's buffers.

``FAST_ACTIVATION_TABLE[name]`` is a FastActivation for every name of ACTIVATIONS.  Sigmoid,
tanh and ReLU, whose backward needs only the output y, overwrite the pre-activation z with y and
write d z into the plan's buffers (identity is ACTIVATIONS' own pair: y is z, dz is dy).  Leaky
ReLU, ELU and maxout, whose backward needs z or the arg-max, are ACTIVATIONS' readable pair (new
tensors every step).  Each in-place op is the op of the readable pair in manual/activations.py,
on the same operands in the same order, so the same bits.
"""
import torch

from manual.activations import ACTIVATIONS


class FastActivation:
    """forward: (z, **options) -> (y, cache); backward: (dy, cache, layer) -> dz, layer holding
    the plan's buffers for it (manual.fast.BackwardLayer); in_place: y is z's buffer and needs
    no new tensor; tmp: backward needs the layer's scratch temporary; over_y: backward writes
    dz over y (default: tmp; an in-place one with neither: dz is dy's buffer)."""

    def __init__(self, forward, backward, in_place, tmp, over_y=None):
        self.forward, self.backward, self.in_place, self.tmp = forward, backward, in_place, tmp
        self.over_y = tmp if over_y is None else over_y


def relu_backward_over(dy, y_bits, dy_bits=None):
    """dx = where(y <= 0, +0, dy) in place in dy, as activations.relu_backward (a select, not
    dy·mask: +0 not −0, no inf·0), for y = ReLU's output given as its bits (an integer view),
    which this overwrites.  Integer ops on the bits are vectorized and allocate nothing (where,
    masked_fill_ and a comparison into integers do neither).  ReLU's output is ±0, positive or
    NaN, so y <= 0 exactly where its bits without the sign are 0; the mask is all ones where dy
    passes and 0 where +0 goes.  dy_bits: dy's integer view, if the caller keeps one.  Returns
    dy."""
    magnitude = torch.iinfo(y_bits.dtype).max                 # every bit but the sign
    mask = y_bits.bitwise_and_(magnitude).clamp_max_(1).neg_()
    (dy.view(mask.dtype) if dy_bits is None else dy_bits).bitwise_and_(mask)
    return dy


def _sigmoid_forward(z):
    y = z.sigmoid_()
    return y, y


def _sigmoid_backward(dy, y, layer):
    # dx = dy·(1 − y)·y: (1 − y), ·dy, ·y into y's buffer (a·b = b·a exactly)
    tmp = torch.sub(layer.one, y, out=layer.tmp)    # 1 − y, one correctly rounded subtraction
    tmp.mul_(dy)
    return torch.mul(tmp, y, out=y)


def _tanh_forward(z):
    y = z.tanh_()
    return y, y


def _tanh_backward(dy, y, layer):
    # dx = dy·(1 − y²), (1 − y²) one fused addcmul, as activations.tanh_backward, over y (each
    # element reads its y before writing it), then ·dy (a·b = b·a exactly): no temporary
    torch.addcmul(layer.one, y, y, value=-1, out=y)
    return y.mul_(dy)


def _relu_forward(z):
    y = z.relu_()
    return y, y


def _relu_backward(dy, y, layer):
    # over y, which is done with
    return relu_backward_over(dy, layer.y_bits, layer.view_of(dy, layer.y_bits.dtype))


def _readable(name, in_place=False):
    """ACTIVATIONS' pair of name, its backward taking (and ignoring) the layer's buffers."""
    forward, backward, _ = ACTIVATIONS[name]
    return FastActivation(forward, lambda dy, cache, layer: backward(dy, cache), in_place, False)


_IN_PLACE = {"sigmoid": FastActivation(_sigmoid_forward, _sigmoid_backward, True, True),
             "tanh": FastActivation(_tanh_forward, _tanh_backward, True, False, over_y=True),
             "relu": FastActivation(_relu_forward, _relu_backward, True, False),
             "identity": _readable("identity", in_place=True)}   # y = z, dz = dy: nothing to do

FAST_ACTIVATION_TABLE = {name: _IN_PLACE.get(name) or _readable(name) for name in ACTIVATIONS}
IN_PLACE_ACTIVATIONS = tuple(name for name, a in FAST_ACTIVATION_TABLE.items() if a.in_place)
