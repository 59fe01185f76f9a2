"""Inverted dropout, a forward/backward pair.  Shapes: x (N, D), out (N, D).

training, 0 < p < 1:  mask ~ Bernoulli(1 − p) per element,  out = x · mask/(1 − p)
eval, or p == 0:      out = x
The scaled mask ``mask/(1 − p)`` is what the backward multiplies by: dx = dout · mask/(1 − p).

Same seed, same mask.  On the CPU ``nn.Dropout`` (F.dropout → at::dropout → _dropout_impl,
aten/src/ATen/native/Dropout.cpp) draws
    noise = torch.empty_like(x).bernoulli_(1 − p);  noise.div_(1 − p);  out = x * noise
from the default CPU generator (the fused native_dropout kernel is used only on CUDA/XPU).
``dropout_forward`` issues the same two calls, on ``generator`` if given, else on the default
generator.  A torch.Generator and the default generator seeded with the same number are in the
same state, and bernoulli_ consumes them the same way, so a manual run on
``torch.Generator().manual_seed(s)`` and a twin run after ``torch.manual_seed(s)`` draw the same
masks, step after step, as long as both draw in the same order (one mask per dropout layer per
forward pass, layer by layer).  p == 0 and eval mode draw nothing, as at::dropout.
"""
import torch

from manual import _check


def dropout_forward(x, p, *, training=True, generator=None):
    """x (N, D) -> (out (N, D), cache); the cache is the scaled mask mask/(1 − p) or None."""
    _check.tensor("x", x)
    p = _check.check_dropout(p)
    if not training or p == 0 or x.numel() == 0:
        return x, None
    noise = torch.empty_like(x).bernoulli_(1 - p, generator=generator)
    noise.div_(1 - p)
    return x * noise, noise


def dropout_backward(dout, cache):
    """dout (N, D) -> dx (N, D)."""
    # out = x·m/(1−p)  ⇒  dx = dout·m/(1−p)
    if cache is None:
        return dout
    if dout.shape != cache.shape:
        raise ValueError(f"dout: expected shape {list(cache.shape)}, got {list(dout.shape)}")
    return dout * cache
