"""The scalar tail of a CPU kernel's loop, where it calls the C library (std::exp, std::erf, ...).

ATen's cpu_kernel_vec computes most elements in SLEEF vector lanes and the remainder of each chunk
(fewer than 2·Vec::size() elements; manual.kernel_exp.vector_lanes says which) with the scalar
lambda, whose std::exp / std::erf / std::tanh on double are glibc's exp / erf / tanh.  Python's
``math`` module calls the same libm functions (measured identical on 200 000 values each), so in
float64 those few elements are computed here one by one with ``math``: bitwise with the kernel.
float32's std::expf / erff / tanhf have no ``math`` counterpart; callers keep their own
approximation there (or mirror glibc's algorithm, as manual/kernel_tanh.py does for tanhf).
"""
import math

import torch


def _exp(v):
    try:
        return math.exp(v)
    except OverflowError:                       # libm returns +inf; math raises instead
        return math.inf


LIBM = {"exp": _exp, "erf": math.erf, "tanh": math.tanh}


def patch_tail(values, x, lanes, name):
    """values with every position outside lanes (a bool mask shaped like x) replaced by libm's
    name(x) there.  float64 on CPU only; anything else is returned unchanged."""
    if lanes is None or x.dtype != torch.float64 or x.device.type != "cpu":
        return values
    tail = (~lanes).reshape(-1).nonzero().flatten()
    if tail.numel() == 0:
        return values
    fn = LIBM[name]
    exact = torch.tensor([fn(v) for v in x.reshape(-1)[tail].tolist()], dtype=torch.float64)
    out = values.clone().reshape(-1)
    out[tail] = exact
    return out.view(values.shape)
