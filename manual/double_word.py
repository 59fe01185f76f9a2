"""Double-word arithmetic as SLEEF writes it (its df.h / dd.h, FMA builds), in plain tensor ops.

A double-word number is a pair (hi, lo) of tensors of one dtype whose unevaluated sum carries about
twice the dtype's precision.  SLEEF's float (``df*``) and double (``dd*``) versions are the same
formulas, so each function here serves both dtypes.  The names follow SLEEF's: ``add`` assumes
|x| >= |y| (two adds fewer), ``add2`` does not.  Every op rounds as the C code does, one rounding
per ``+ - * /`` and one per fused multiply-add (``torch.addcmul`` is one FMA on x86 CPUs; see
manual/kernel_exp.py).
"""
import torch


def fma(a, b, c):
    # a·b + c, one rounding
    return torch.addcmul(c, a, b)


def fms(a, b, c):
    # a·b − c, one rounding (vfmapn)
    return torch.addcmul(-c, a, b)


def fnma(a, b, c):
    # c − a·b, one rounding (vfmanp)
    return torch.addcmul(c, a, b, value=-1)


def add_w_w(x, y):
    """(x.hi + y.hi, ...): x, y double-words, |x| >= |y| (dfadd_vf2_vf2_vf2)."""
    s = x[0] + y[0]
    return s, (((x[0] - s) + y[0]) + x[1]) + y[1]


def add2_w_w(x, y):
    """x + y for double-words of any magnitudes (dfadd2_vf2_vf2_vf2)."""
    s = x[0] + y[0]
    v = s - x[0]
    t = (x[0] - (s - v)) + (y[0] - v)
    return s, t + (x[1] + y[1])


def add2_w_s(x, y):
    """x + y, x a double-word, y a single word (dfadd2_vf2_vf2_vf)."""
    s = x[0] + y
    v = s - x[0]
    t = (x[0] - (s - v)) + (y - v)
    return s, t + x[1]


def add_s_w(x, y):
    """x + y, x a single word, |x| >= |y| (dfadd_vf2_vf_vf2)."""
    s = x + y[0]
    return s, ((x - s) + y[0]) + y[1]


def mul_w_s(x, y):
    """x · y, y a single word (dfmul_vf2_vf2_vf)."""
    s = x[0] * y
    return s, fma(x[1], y, fms(x[0], y, s))


def mul_w_w(x, y):
    """x · y (dfmul_vf2_vf2_vf2)."""
    s = x[0] * y[0]
    return s, fma(x[0], y[1], fma(x[1], y[0], fms(x[0], y[0], s)))


def square(x):
    """x² (dfsqu_vf2_vf2)."""
    s = x[0] * x[0]
    return s, fma(x[0] + x[0], x[1], fms(x[0], x[0], s))


def reciprocal(d):
    """1 / d (dfrec_vf2_vf2)."""
    s = 1 / d[0]
    return s, s * fnma(d[1], s, fnma(d[0], s, torch.ones_like(s)))


def divide(n, d):
    """n / d (dfdiv_vf2_vf2_vf2)."""
    t = 1 / d[0]
    s = n[0] * t
    u = fms(t, n[0], s)
    v = fnma(d[1], t, fnma(d[0], t, torch.ones_like(t)))
    return s, fma(s, v, fma(n[1], t, u))


def neg(x):
    return -x[0], -x[1]
