"""glibc's float tanhf, expf and erff, as the scalar tail of a CPU kernel calls them (std::tanh,
std::exp, std::erf on float), in tensor ops.

Python's ``math`` reaches only the double functions.  glibc 2.36 (this machine) implements tanhf
(with the expm1f it calls) and erff with the SunPro (fdlibm) algorithms of sysdeps/ieee754/flt-32,
built for baseline x86-64: every ``+ − × ÷`` rounds to float once, which float32 tensor ops
reproduce exactly.  expf (glibc 2.27+) works in double with a 32-entry table; x86-64 runs the
build compiled with FMA.  Branches are evaluated for every element and selected with ``where``.
Each mirror agrees with the C library on every value tested (tests/test_smooth_activations.py,
about a million values each when written).  glibc 2.41 replaced tanhf and erff by correctly
rounded CORE-MATH code: on such a system these two mirrors (and the tail bits) no longer hold.
"""
import torch


def _f(bits):
    # the float32 whose bit pattern is the unsigned 32-bit integer bits, as a Python float
    signed = bits - (1 << 32) if bits >= 1 << 31 else bits
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32).item()


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


# expf (glibc 2.27+, sysdeps/ieee754/flt-32/e_expf.c; on x86-64 with FMA its ifunc picks the build
# compiled with -mfma, where the compiler contracts the three a·b + c of the polynomial): in
# double, x·32/ln2 = k + r, eˣ = 2^(k/32) · (1 + C2·r + C1·r² + C0·r³), rounded once to float.
# _EXP2_TAB[i] is the bit pattern of 2^(i/32) (correctly rounded) minus i << 47.
_EXP2_TAB = (
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51,
    0x3fef72b83c7d517b, 0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715, 0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
    0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429, 0x3feea47eb03a5585,
    0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
    0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069,
    0x3fef5818dcfba487, 0x3fef7c97337b9b5f, 0x3fefa4afa2a490da, 0x3fefd0765b6e4540)
_EXPF_POLY = (float.fromhex("0x1.c6af84b912394p-5") / 32 / 32 / 32,
              float.fromhex("0x1.ebfce50fac4f3p-3") / 32 / 32,
              float.fromhex("0x1.62e42ff0c52d6p-1") / 32)
_INVLN2_32 = float.fromhex("0x1.71547652b82fep+0") * 32
_SHIFT = float.fromhex("0x1.8p+52")


def expf(x):
    """eˣ for float32 x, elementwise, as glibc's __expf (FMA build)."""
    if x.dtype != torch.float32:
        raise TypeError(f"x: expected float32, got {x.dtype}")
    xd = x.double().clamp(-110.0, 100.0)                         # outside: the selects below
    z = _INVLN2_32 * xd
    kd = (z + _SHIFT) - _SHIFT                                    # rint(z), ties to even
    r = z - kd
    k = kd.to(torch.int64)
    tab = torch.tensor(_EXP2_TAB, dtype=torch.int64, device=x.device)
    s = (tab[k & 31] + (k << 47)).view(torch.float64)             # 2^(k/32)
    one = torch.ones_like(r)
    c0, c1, c2 = (torch.tensor(c, dtype=torch.float64, device=x.device) for c in _EXPF_POLY)
    y = torch.addcmul(torch.addcmul(one, c2, r), torch.addcmul(c1, c0, r), r * r)
    y = (y * s).float()
    y = torch.where(x > float.fromhex("0x1.62e42ep6"), torch.inf, y)
    y = torch.where(x < float.fromhex("-0x1.9fe368p6"), 0.0, y)
    return torch.where(x.isnan(), x, y)


# erff (fdlibm, sysdeps/ieee754/flt-32/s_erff.c; glibc 2.41 replaced it by CORE-MATH's): rational
# approximations on [0, 0.84375), [0.84375, 1.25), [1.25, 1/0.35), [1/0.35, 6), 1 above, with
# erfc = e^(−z² − 0.5625) · e^((z − x)(z + x) + R/S) / x on the last two.  Bit patterns of its
# coefficients, lowest degree first.
_ERFF = {
    "efx": 0x3e0375d4, "erx": 0x3f58560b,
    "pp": (0x3e0375d4, 0xbea66beb, 0xbce9528f, 0xbbbd1489, 0xb7c756b1),
    "qq": (0x3f800000, 0x3ecbbbce, 0x3d852a63, 0x3ba68116, 0x390aee49, 0xb684e21a),
    "pa": (0xbb1acdc6, 0x3ed46805, 0xbebe9208, 0x3ea2fe54, 0xbde31cc2, 0x3d1151b3, 0xbb0df9c0),
    "qa": (0x3f800000, 0x3dd9f331, 0x3f0a5785, 0x3d931ae7, 0x3e013307, 0x3c5f6e13, 0x3c445aa3),
    "ra": (0xbc21a093, 0xbf31a0b7, 0xc128f022, 0xc2798057, 0xc322658c, 0xc3389ae7, 0xc2a2932b,
           0xc11d077e),
    "sa": (0x3f800000, 0x419d35ce, 0x4309a863, 0x43d9486f, 0x442158c9, 0x43d6810b, 0x42d9451f,
           0x40d23f7c, 0xbd777f97),
    "rb": (0xbc21a092, 0xbf4c9dd4, 0xc18e104b, 0xc320a2ea, 0xc41f6441, 0xc480230b, 0xc3f1c275),
    "sb": (0x3f800000, 0x41f2b459, 0x43a2e571, 0x44c01759, 0x4547fdbb, 0x451f90ce, 0x43ed43a7,
           0xc1b38712),
}


def _poly(s, key):
    # c0 + s·(c1 + s·(c2 + …)), innermost first, every step rounded (no FMA in this build)
    coefs = [_f(b) for b in _ERFF[key]]
    v = torch.full_like(s, coefs[-1])
    for c in reversed(coefs[:-1]):
        v = c + s * v
    return v


def erff(x):
    """erf(x) for float32 x, elementwise, as glibc's __erff."""
    if x.dtype != torch.float32:
        raise TypeError(f"x: expected float32, got {x.dtype}")
    ax = x.abs()
    efx, erx = _f(_ERFF["efx"]), _f(_ERFF["erx"])
    z = x * x
    small = x + x * (_poly(z, "pp") / _poly(z, "qq"))                     # |x| < 0.84375
    tiny = torch.where(ax < _f(0x04000000), 0.0625 * (16.0 * x + (16.0 * efx) * x), x + efx * x)
    s = ax - 1
    mid = erx + _poly(s, "pa") / _poly(s, "qa")                           # |x| < 1.25
    a = torch.clamp(ax, 1.0, 6.0)                                         # the tail's own range
    s = 1 / (a * a)
    near = a < _f(0x4036DB6E)                                             # |x| < 1/0.35
    ratio = torch.where(near, _poly(s, "ra") / _poly(s, "sa"), _poly(s, "rb") / _poly(s, "sb"))
    zt = (a.view(torch.int32) & -4096).view(torch.float32)                # low 12 bits cleared
    r = expf(-zt * zt - 0.5625) * expf((zt - a) * (zt + a) + ratio)
    far = 1 - r / a
    out = torch.where(ax < _f(0x3fa00000), mid, far)
    out = torch.where(ax >= 6, 1.0, out)
    out = torch.where(torch.signbit(x), -out, out)
    out = torch.where(ax < _f(0x3f580000), torch.where(ax < _f(0x31800000), tiny, small), out)
    return torch.where(x.isnan(), x, out)
