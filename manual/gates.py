"""The gates of a computational graph, each a forward/backward pair: add, mul, max, copy.

"Upstream gradient times local gradient" (section 1 of the document): every backward takes the
upstream gradient dout and returns one gradient per input.  Inputs are tensors of any one shape
(0-d for the document's scalar graphs).

Ties of the max gate are not covered by the document; PyTorch has two conventions and both are
here:  ``maximum`` (torch.maximum, amax, max() without dim) splits a tie evenly;  ``max_dim``
(torch.max(x, dim), used by Maxout) routes the whole gradient to the first maximal index.
"""
import torch


def add_forward(a, b):
    return a + b, None


def add_backward(dout, cache):
    # ∂(a+b)/∂a = ∂(a+b)/∂b = 1: the gradient distributor hands dout to both inputs
    return dout, dout


def mul_forward(a, b):
    return a * b, (a, b)


def mul_backward(dout, cache):
    # ∂(ab)/∂a = b, ∂(ab)/∂b = a: the swap multiplier
    a, b = cache
    return dout * b, dout * a


def maximum_forward(a, b):
    return torch.maximum(a, b), (a, b)


def maximum_backward(dout, cache):
    # ∂max(a,b)/∂a = 1 if a > b, ½ if a = b, 0 if a < b: the router (ties split evenly).
    # derivatives.yaml: where(a == b, g / 2, g).masked_fill_(a < b, 0), and symmetrically for b.
    a, b = cache
    da = torch.where(a == b, dout / 2, dout).masked_fill_(a < b, 0)
    db = torch.where(a == b, dout / 2, dout).masked_fill_(a > b, 0)
    return da, db


def max_dim_forward(x, dim):
    """x: any shape -> (values, cache): max over `dim` (first maximal index on ties)."""
    values, index = x.max(dim)
    return values, (x.shape, index, dim)


def max_dim_backward(dout, cache):
    # ∂max/∂x_j = 1 at the selected index j (the first maximal one), 0 elsewhere: scatter dout.
    shape, index, dim = cache
    dx = torch.zeros(shape, dtype=dout.dtype, device=dout.device)
    return dx.scatter_(dim, index.unsqueeze(dim), dout.unsqueeze(dim))


def amax_forward(x, dim):
    values = x.amax(dim)
    return values, (x, values, dim)


def amax_backward(dout, cache):
    # ∂amax/∂x_j = 1/(number of maximal entries) at each maximal j: ties split evenly.
    # scale_grad_by_count in FunctionsManual.cpp: (g / mask.sum(dim, keepdim)) * mask.
    x, values, dim = cache
    mask = x == values.unsqueeze(dim)
    return (dout.unsqueeze(dim) / mask.sum(dim, keepdim=True)) * mask


def copy_forward(x, n=2):
    """One value used n times: returns n references and the count."""
    return [x] * n, n


def copy_backward(douts):
    # each use contributes its upstream gradient: the gradient adder sums them (left to right,
    # as the autograd engine accumulates two uses: old + new)
    total = douts[0]
    for d in douts[1:]:
        total = total + d
    return total
