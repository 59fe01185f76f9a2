"""Loss functions: forward returns (loss, cache), backward(dloss, cache) returns dy_pred.

Shapes: y_pred (N, C); target (N, C) for the regression losses.  dloss is the upstream gradient
of the scalar loss (1.0 when the loss is the end of the graph).
"""
import torch


def sum_squared_forward(y_pred, target):
    """The document's loss: L = Σ (y_pred − target)², summed over batch and outputs."""
    diff = y_pred - target
    return (diff * diff).sum(), diff


def sum_squared_backward(dloss, diff):
    # ∂L/∂y_pred = 2(y_pred − target); mse_loss_backward: (2·diff)·g in the tensor's dtype.
    return (2.0 * diff) * dloss


def mse_forward(y_pred, target):
    """L = mean over all N·C elements of (y_pred − target)²."""
    diff = y_pred - target
    return (diff * diff).mean(), diff


def mse_backward(dloss, diff):
    # ∂L/∂y_pred = (2/(N·C))·(y_pred − target); the factor 2/numel is formed in double, as Loss.cpp.
    return ((2.0 / diff.numel()) * diff) * dloss


# name -> (forward, backward, kind of target: "values" (N, C) float, or "labels" (N,) int64)
LOSSES = {
    "sum_squared": (sum_squared_forward, sum_squared_backward, "values"),
    "mse": (mse_forward, mse_backward, "values"),
}


def _lookup(name):
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"loss: unknown name {name!r}; expected one of {', '.join(LOSSES)}") from None


def target_kind(name):
    return _lookup(name)[2]


def loss_forward(name, y_pred, target):
    fwd, _, kind = _lookup(name)
    if kind == "values":
        if target.shape != y_pred.shape:
            raise ValueError(f"target: expected shape {list(y_pred.shape)} (that of the "
                             f"predictions), got {list(target.shape)}")
        if target.dtype != y_pred.dtype:
            raise TypeError(f"target: expected dtype {y_pred.dtype}, got {target.dtype}")
    return fwd(y_pred, target)


def loss_backward(name, dloss, cache):
    return _lookup(name)[1](dloss, cache)
