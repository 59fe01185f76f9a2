"""Central finite differences in float64: the third oracle for every gradient.

rel_error is CS231n's measure: |a − n| / max(|a| + |n|, tiny).
"""
import torch


def rel_error(analytic, numeric):
    a, n = analytic.double(), numeric.double()
    return (a - n).abs() / (a.abs() + n.abs()).clamp_min(1e-300)


def numeric_gradient(f, x, dout=None, eps=1e-6, indices=None):
    """Numerical gradient of sum(f(x) * dout) with respect to x (modified in place, restored).

    f: a function of no arguments that reads x and returns a tensor (or a scalar tensor).
    indices: flat indices of x to perturb (default: all).  Returns a tensor like x with the
    estimates at those indices and NaN elsewhere.
    """
    if x.dtype != torch.float64:
        raise TypeError(f"x: finite differences run in float64, got {x.dtype}")
    flat = x.view(-1)
    grad = torch.full_like(flat, float("nan"))
    todo = range(flat.numel()) if indices is None else indices
    for i in todo:
        i = int(i)
        old = flat[i].item()
        flat[i] = old + eps
        plus = f()
        flat[i] = old - eps
        minus = f()
        flat[i] = old
        diff = plus - minus
        if dout is not None:
            diff = diff * dout
        grad[i] = diff.sum() / (2 * eps)
    return grad.view_as(x)
