"""The scalar tail of a CPU kernel's loop, where it calls the C library (std::exp, std::erf, ...).

ATen's cpu_kernel_vec computes most elements in SLEEF vector lanes and the remainder of each chunk
(fewer than 2·Vec::size() elements; manual.kernel_exp.vector_lanes says which) with the scalar
lambda, whose std::exp / std::erf / std::tanh on double are glibc's exp / erf / tanh.  Python's
``math`` module calls the same libm functions (measured identical on 200 000 values each), so in
float64 those few elements are computed here one by one with ``math``: bitwise with the kernel.
float32's std::tanh, std::exp and std::erf are glibc's tanhf, expf and erff, mirrored in float32
tensor ops by manual/glibc_float.py.
"""
import math

import torch

from manual import glibc_float


def _exp(v):
    try:
        return math.exp(v)
    except OverflowError:                       # libm returns +inf; math raises instead
        return math.inf


LIBM = {"exp": _exp, "erf": math.erf, "tanh": math.tanh}      # float64, one value at a time
LIBM_F32 = {"tanh": glibc_float.tanhf, "exp": glibc_float.expf, "erf": glibc_float.erff}                          # float32, tensor ops


def patch_tail(values, x, lanes, name):
    """values with every position outside lanes (a bool mask shaped like x) replaced by libm's
    name(x) there.  CPU, float32 or float64; anything else is returned unchanged."""
    if lanes is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return values
    tail = (~lanes).reshape(-1).nonzero().flatten()
    if tail.numel() == 0:
        return values
    at = x.reshape(-1)[tail]
    if x.dtype == torch.float32:
        exact = LIBM_F32[name](at)
    else:
        exact = torch.tensor([LIBM[name](v) for v in at.tolist()], dtype=torch.float64)
    out = values.clone().reshape(-1)
    out[tail] = exact
    return out.view(values.shape)
