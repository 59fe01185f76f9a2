"""glibc's float tanhf, as the scalar tail of a CPU kernel calls it (std::tanh on float), in float32
tensor ops.

glibc 2.36 (this machine; x86-64 baseline build, no FMA) implements tanhf and the expm1f it calls
with the SunPro (fdlibm) algorithms of sysdeps/ieee754/flt-32: every ``+ − × ÷`` rounds to float
once, which float32 tensor ops reproduce exactly.  It is not reachable through Python's ``math``
(double only), and float64's tanh rounded to float differs from it on ~5% of values.  Branches are
evaluated for every element and selected with ``where``.  (glibc 2.41 replaced both by
correctly rounded CORE-MATH code; refnet/not_bitwise.py's entry names the version.)
"""
import struct

import torch


def _f(bits):
    return struct.unpack("<f", struct.pack("<I", bits))[0]


_LN2_HI, _LN2_LO, _INVLN2 = _f(0x3f317180), _f(0x3717f7d1), _f(0x3fb8aa3b)
_Q = (_f(0xbd088889), _f(0x3ad00d01), _f(0xb8a670cd), _f(0x36867e54), _f(0xb457edbb))


def _c(v, like):
    return torch.tensor(v, dtype=torch.float32, device=like.device)


def _scale_pow2(y, k):
    # add k to y's exponent (SET_FLOAT_WORD(y, i + (k << 23))): y·2^k, exact for the y, k used
    bits = y.view(torch.int32) + (k.to(torch.int32) << 23)
    return bits.view(torch.float32)


def _reduce(x):
    """fdlibm's argument reduction: (k, hi − lo rounded, c) for 0.5·ln2 < |x|; k = 0 elsewhere."""
    ax = x.abs()
    positive = ~torch.signbit(x)
    near = ax < _f(0x3f851592)                                    # |x| < 1.5·ln2: k = ±1
    k_far = (_c(_INVLN2, x) * x + torch.where(positive, 0.5, -0.5)).trunc()   # (int32) cast
    k = torch.where(near, torch.where(positive, 1.0, -1.0), k_far)
    hi = torch.where(near, x - torch.where(positive, _LN2_HI, -_LN2_HI), x - k * _LN2_HI)
    lo = torch.where(near, torch.where(positive, _LN2_LO, -_LN2_LO), k * _LN2_LO)
    reduced = hi - lo
    c = (hi - reduced) - lo
    big = ax > _f(0x3eb17218)
    zero = torch.zeros_like(x)
    return torch.where(big, k, zero), torch.where(big, reduced, x), torch.where(big, c, zero)


def expm1f(x):
    """eˣ − 1 for float32 x with |x| < 88 (what tanhf passes), as glibc's __expm1f."""
    k, r, c = _reduce(x)
    hfx = 0.5 * r
    hxs = r * hfx
    poly = _c(_Q[4], x) * hxs
    for q in (_Q[3], _Q[2], _Q[1], _Q[0]):
        poly = hxs * (q + poly)
    r1 = 1 + poly
    t = 3 - r1 * hfx
    e = hxs * ((r1 - t) / (6 - r * t))
    k0 = r - (r * e - hxs)
    e = (r * (e - c) - c) - hxs
    k_minus1 = 0.5 * (r - e) - 0.5
    k_plus1 = torch.where(r < -0.25, -2.0 * (e - (r + 0.5)), 1 + 2.0 * (r - e))
    ki = k.to(torch.int32)
    wide = _scale_pow2(1 - (e - r), k) - 1                       # k <= −2 or k > 56
    shifted = torch.full_like(ki, 0x1000000).bitwise_right_shift(ki.clamp(0, 23))
    one_minus = (0x3f800000 - shifted).view(torch.float32)       # 1 − 2^−k
    mid = _scale_pow2(one_minus - (e - r), k)                     # 2 <= k < 23
    two_minus = (0x7f - ki.clamp(0, 127)).bitwise_left_shift(23).view(torch.float32)   # 2^−k
    high = _scale_pow2((r - (e + two_minus)) + 1, k)              # 23 <= k <= 56
    out = torch.where(k >= 23, high, mid)
    out = torch.where((k <= -2) | (k > 56), wide, out)
    out = torch.where(k == 1, k_plus1, out)
    out = torch.where(k == -1, k_minus1, out)
    out = torch.where(k == 0, k0, out)
    out = torch.where(x.abs() < _f(0x33000000), x, out)           # |x| < 2^−25: x
    return torch.where((x < 0) & (x.abs() >= _f(0x4195b844)), -1.0, out)   # x <= −27·ln2: −1


def tanhf(x):
    """tanh(x) for float32 x, elementwise, as glibc's __tanhf."""
    if x.dtype != torch.float32:
        raise TypeError(f"x: expected float32, got {x.dtype}")
    ax = torch.clamp(x.abs(), max=22.0)                           # the values above 22 are unused
    t_big = expm1f(2.0 * ax)                                      # |x| >= 1
    t_small = expm1f(-2.0 * ax)
    z = torch.where(ax >= 1, 1 - 2.0 / (t_big + 2.0), -t_small / (t_small + 2.0))
    z = torch.where(x.abs() >= 22, 1.0, z)
    z = torch.where(torch.signbit(x), -z, z)
    z = torch.where(x.abs() < _f(0x24000000), x * (1 + x), z)    # |x| < 2^−55 (and ±0)
    return torch.where(x.isnan(), x, z)
