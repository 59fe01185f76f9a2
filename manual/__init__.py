"""manual — backpropagation written by hand, in torch tensors, without autograd.

Every operation is a pair ``*_forward(...) -> (out, cache)`` / ``*_backward(dout, cache) -> grads``
that sit side by side, with the derivative in a one-line comment. The arithmetic mirrors what
PyTorch's own derivative formulas evaluate, operation for operation, so that on CPU the results
are bit-for-bit identical to autograd.  This package imports torch (and math) only.

Dimension letters used in docstrings: N batch, D input features, H output features of a layer,
C classes / outputs, K maxout pieces.
"""
from manual.layers import linear_forward, linear_backward
from manual.activations import ACTIVATIONS, activation_forward, activation_backward
from manual.losses import LOSSES, loss_forward, loss_backward
from manual.optim import OPTIMIZERS, make_optimizer
from manual.mlp import MLP
from manual._check import NORMS, check_dropout, check_embedding, check_norm

__all__ = [
    "linear_forward", "linear_backward",
    "ACTIVATIONS", "activation_forward", "activation_backward",
    "LOSSES", "loss_forward", "loss_backward",
    "OPTIMIZERS", "make_optimizer", "MLP",
    "NORMS", "check_norm", "check_dropout", "check_embedding",
]
