"""GELU's (erf) derivative as PyTorch's CPU gelu_backward evaluates it, in plain tensor ops.

Two routes, chosen by ``gelu_backward_out_cpu`` (aten/src/ATen/native/Activation.cpp):

* float32, contiguous, more than one element, ``torch.backends.mkldnn.enabled``: oneDNN's
  ``eltwise_backward(gelu_erf)``, a JIT kernel (jit_uni_eltwise_injector ``gelu_erf_compute_
  vector_bwd``; the same instructions on AVX2 and AVX-512, and its tail elements go through the
  same code with a masked load, so position does not matter).  It evaluates erf by Abramowitz &
  Stegun 7.1.26 with oneDNN's own exp (floor-based reduction, degree-5 polynomial):
      R = x/√2,  Q = e^(−R²),  W = 1/(p·|R| + 1),  erf|R| = 1 − Q·W·P(W),
      gelu'(x) = (R·(1/√π)·Q + 0.5) + 0.5·erf(R)          (FMAs where the JIT has them)
  :func:`onednn_gelu_grad` mirrors it instruction by instruction.
* everything else (float64 always): ATen's GeluBackwardKernelImpl,
      dy · (0.5·(1 + erf(x/√2)) + x · (kBeta · e^(−x²/2)))      (x·pdf + cdf one FMA)
  whose vector lanes call ``Vectorized<T>::erf`` and SLEEF's u10 exp (manual.kernel_exp.sleef_exp).
  For double that erf is SLEEF's xerf_u1 (:func:`sleef_erf`); for float it is ATen's own
  Abramowitz & Stegun 7.1.26 with SLEEF's exp (:func:`vec_erf_f32`).  The scalar tail calls glibc's
  erf and exp (manual/libm_tail.py), and does not contract x·pdf + cdf (the vector lanes do).
"""
import math
import torch

from manual import double_word as dw
from manual.kernel_exp import sleef_exp

_R_LN2 = 1.442695040888963407359924681001892137426645954152985934135449406931
_LN2 = (.69314718055966295651160180568695068359375,
        .28235290563031577122588448175013436025525412068e-12)
# xerf_u1's Estrin polynomial in x = |a|, highest power first: |a| <= 2.5, and above
_ERF_NEAR = (-0.2083271002525222097e-14, +0.7151909970790897009e-13, -0.1162238220110999364e-11,
             +0.1186474230821585259e-10, -0.8499973178354613440e-10, +0.4507647462598841629e-9,
             -0.1808044474288848915e-8, +0.5435081826716212389e-8, -0.1143939895758628484e-7,
             +0.1215442362680889243e-7, +0.1669878756181250355e-7, -0.9808074602255194288e-7,
             +0.1389000557865837204e-6, +0.2945514529987331866e-6, -0.1842918273003998283e-5,
             +0.3417987836115362136e-5, +0.3860236356493129101e-5, -0.3309403072749947546e-4,
             +0.1060862922597579532e-3, +0.2323253155213076174e-3, +0.1490149719145544729e-3)
_ERF_FAR = (-0.4024015130752621932e-18, +0.3847193332817048172e-16, -0.1749316241455644088e-14,
            +0.5029618322872872715e-13, -0.1025221466851463164e-11, +0.1573695559331945583e-10,
            -0.1884658558040203709e-9, +0.1798167853032159309e-8, -0.1380745342355033142e-7,
            +0.8525705726469103499e-7, -0.4160448058101303405e-6, +0.1517272660008588485e-5,
            -0.3341634127317201697e-5, -0.2515023395879724513e-5, +0.6539731269664907554e-4,
            -0.3551065097428388658e-3, +0.1210736097958368864e-2, -0.2605566912579998680e-2,
            +0.1252823202436093193e-2, +0.1820191395263313222e-1, -0.1021557155453465954e+0)
# its double-word tail coefficients (hi, lo): near, far
_ERF_DD = (((0.0092877958392275604405, 7.9287559463961107493e-19),
            (-0.63691044383641748361, -2.4249477526539431839e-17)),
           ((0.042275531758784692937, 1.3785226620501016138e-19),
            (-1.1282926061803961737, -6.2970338860410996505e-17)),
           ((0.07052369794346953491, 9.5846628070792092842e-19),
            (-1.2261313785184804967e-05, -5.5329707514490107044e-22)))
_EXPK = (2.51069683420950419527139e-08, 2.76286166770270649116855e-07,
         2.75572496725023574143864e-06, 2.48014973989819794114153e-05,
         0.000198412698809069797676111, 0.0013888888939977128960529,
         0.00833333333332371417601081, 0.0416666666665409524128449,
         0.166666666666666740681535, 0.500000000000000999200722)


def _estrin(x, powers, coefs):
    """SLEEF's POLYn macros: Estrin's scheme over x, x², x⁴, ... (powers), highest coefficient
    first; a lone leading coefficient multiplies the top power directly (POLY5, POLY21)."""
    n = len(coefs)
    if n == 1:
        return coefs[0]
    if n == 2:
        return dw.fma(x, coefs[0], coefs[1])
    level = max(k for k in range(len(powers) + 1) if 2 ** k < n)   # split at the top power
    high, low = coefs[:n - 2 ** level], coefs[n - 2 ** level:]
    return dw.fma(powers[level - 1], _estrin(x, powers, high), _estrin(x, powers, low))


def _pow2(k):
    # 2^k for integer-valued float64 k in [−1022, 1023], written into the exponent bits
    return (k.to(torch.int64) + 1023).bitwise_left_shift_(52).view(torch.float64)


def _expk(d):
    """e^d for a double-word d, rounded to one double (SLEEF's expk; the caller's d is in
    [−40, 0], where 2^q is exact in two halves and nothing over- or underflows)."""
    x = d[0]
    q = torch.round((d[0] + d[1]) * _R_LN2)
    s = dw.add2_w_s(d, q * -_LN2[0])
    s = dw.add2_w_s(s, q * -_LN2[1])
    hi = s[0] + s[1]
    s = (hi, (s[0] - hi) + s[1])                               # ddnormalize
    s2 = s[0] * s[0]
    s4 = s2 * s2
    c = [torch.tensor(v, dtype=x.dtype) for v in _EXPK]
    u = _estrin(s[0], (s2, s4, s4 * s4), c)
    t = dw.add_s_w(torch.ones_like(x), s)
    t = dw.add_w_w(t, dw.mul_w_s(dw.square(s), u))
    q = torch.nan_to_num(q).clamp(-2000, 2000)
    half = torch.floor(q / 2)
    return (t[0] + t[1]) * _pow2(half) * _pow2(q - half)      # vldexp2


def sleef_erf(a):
    """erf(a), elementwise, bit for bit as SLEEF's double erf (xerf_u1, FMA build): float64."""
    if a.dtype != torch.float64:
        raise TypeError(f"a: expected float64, got {a.dtype}")
    x = a.abs()
    near = x <= 2.5
    x2 = x * x
    x4 = x2 * x2
    x8 = x4 * x4
    pick = lambda lo, hi: torch.where(near, lo, hi)             # noqa: E731  vsel per lane
    coefs = [pick(torch.tensor(n, dtype=a.dtype), torch.tensor(f, dtype=a.dtype))
             for n, f in zip(_ERF_NEAR, _ERF_FAR)]
    t = _estrin(x, (x2, x4, x8, x8 * x8), coefs)
    c2, c1, c0 = [(pick(torch.tensor(n[0], dtype=a.dtype), torch.tensor(f[0], dtype=a.dtype)),
                   pick(torch.tensor(n[1], dtype=a.dtype), torch.tensor(f[1], dtype=a.dtype)))
                  for n, f in _ERF_DD]
    zero = torch.zeros_like(x)
    # poly4dd: (c0 + c1·x) + x²·(c2 + t·x), each step a double-word multiply-add
    inner = dw.add_w_w(c2, dw.mul_w_s((t, zero), x))
    outer = dw.add_w_w(c0, dw.mul_w_s(c1, x))
    t2 = dw.add_w_w(outer, dw.mul_w_s(inner, x2))
    s = dw.add_s_w(torch.ones_like(x), dw.mul_w_s(t2, x))
    for _ in range(4):
        s = dw.square(s)                                        # (1 + x·P(x))^16
    s = dw.reciprocal(s)
    e = _expk((torch.clamp(t2[0], min=-800.0), t2[1]))
    t2 = (torch.where(near, s[0], e), torch.where(near, s[1], zero))
    t2 = dw.add2_w_s(t2, torch.tensor(-1.0, dtype=a.dtype))
    z = -(t2[0] + t2[1])
    z = torch.where(x < 1e-8, x * 1.12837916709551262756245475959, z)
    z = torch.where((x >= 6) | a.isinf(), 1.0, z)
    z = torch.where(a == 0, 0.0, z)
    return torch.where(torch.signbit(a), -z, z)                 # vmulsign


_AS_P, _AS_POL = 0.3275911, (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


def vec_erf_f32(x):
    """erf(x) as ATen's Vectorized<float>::erf (not SLEEF's: Abramowitz & Stegun 7.1.26 with
    SLEEF's exp, FMAs as written in vec256_float.h): float32."""
    if x.dtype != torch.float32:
        raise TypeError(f"x: expected float32, got {x.dtype}")
    c = [torch.tensor(v, dtype=torch.float32, device=x.device) for v in (_AS_P,) + _AS_POL]
    t = 1 / dw.fma(c[0], x.abs(), torch.ones_like(x))
    r = c[1].expand_as(t)
    for coef in c[2:]:
        r = dw.fma(r, t, coef)
    e = sleef_exp(-(x * x))
    erf = dw.fma(-e * t, r, torch.ones_like(x))
    return torch.where(torch.signbit(x), -erf, erf)


def _f32(bits):
    # the float32 whose bit pattern is the unsigned 32-bit integer bits, as a Python float
    signed = bits - (1 << 32) if bits >= 1 << 31 else bits
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32).item()


# oneDNN's table (jit_uni_eltwise_injector register_table_entries), as float32 bit patterns
_DNNL = {"ln_flt_min": 0xc2aeac50, "ln_flt_max": 0x42b17218, "log2e": 0x3fb8aa3b,
         "ln2": 0x3f317218, "one_over_sqrt_two": 0x3f3504f3, "one_over_sqrt_pi": 0x3f106eba,
         "p": 0x3ea7ba05}
_DNNL_EXP_POL = (0x3f7ffffb, 0x3efffee3, 0x3e2aad40, 0x3d2b9d0d, 0x3c07cfce)
_DNNL_ERF_POL = (0x3e827906, 0xbe91a98e, 0x3fb5f0e3, 0xbfba00e3, 0x3f87dc22)


def _dnnl(name, like):
    return torch.tensor(_f32(_DNNL[name]), dtype=torch.float32, device=like.device)


def _horner(w, bits, last):
    # p4·w + p3, ·w + p2, ... ·w + p0 (vfmadd213ps each), then ·w + last if given
    pol = [torch.tensor(_f32(b), dtype=torch.float32, device=w.device) for b in bits]
    p = pol[4].expand_as(w)
    for k in (3, 2, 1, 0):
        p = dw.fma(p, w, pol[k])
    return p if last is None else dw.fma(p, w, last)


def onednn_exp(v):
    """e^v as oneDNN's JIT exp_compute_vector_fwd: float32."""
    lo, hi = _dnnl("ln_flt_min", v), _dnnl("ln_flt_max", v)
    under = v < lo
    v = torch.minimum(torch.maximum(v, lo), hi)
    n = torch.floor(v * _dnnl("log2e", v) + 0.5)
    r = dw.fnma(n, _dnnl("ln2", v), v)                         # v − n·ln 2, one rounding
    bits = (torch.nan_to_num(n - 1).to(torch.int32) + 127).bitwise_left_shift_(23)
    scale = torch.where(under, 0.0, bits.view(torch.float32))  # 2^(n−1), 0 below ln FLT_MIN
    return _horner(r, _DNNL_EXP_POL, torch.ones_like(r)) * scale * 2


def onednn_gelu_grad(x):
    """gelu'(x) (erf form) as oneDNN's gelu_erf_compute_vector_bwd: float32."""
    r = x * _dnnl("one_over_sqrt_two", x)
    q = onednn_exp(-(r * r))
    t = r * _dnnl("one_over_sqrt_pi", x) * q
    w = 1 / dw.fma(_dnnl("p", x), r.abs(), torch.ones_like(r))
    erf = dw.fma(-q * w, _horner(w, _DNNL_ERF_POL, None), torch.ones_like(r))
    erf = torch.where(torch.signbit(r), -erf, erf)
    return dw.fma(erf, torch.tensor(0.5, device=x.device), t + 0.5)


def uses_onednn(x):
    """True where gelu_backward_out_cpu hands x to oneDNN (use_onednn in Activation.cpp)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
            and x.numel() > 1 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled)


ALPHA = math.sqrt(0.5)                                          # M_SQRT1_2
BETA = (2 / math.sqrt(math.pi)) * math.sqrt(0.5) * 0.5          # M_2_SQRTPI·M_SQRT1_2·0.5
