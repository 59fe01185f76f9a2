"""Argument checks shared by the manual ops: one-line errors that name the argument."""
import torch


def tensor(name, t, ndim=None, floating=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {list(t.shape)}")
    return t


def same(name_a, a, name_b, b):
    """a and b must share dtype and device."""
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b}: expected dtype {a.dtype} to match {name_a}, got {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_b}: expected device {a.device} to match {name_a}, got {b.device}")
