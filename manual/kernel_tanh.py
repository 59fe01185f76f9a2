"""tanh as PyTorch's CPU gelu_backward (approximate="tanh") kernel evaluates it, in plain tensor ops.

The kernel's vector lanes call ``Vectorized<T>::tanh``, which is SLEEF's ``Sleef_tanhf8_u10`` /
``Sleef_tanhd4_u10`` on AVX2 (``f16``/``d8`` on AVX-512: the same algorithm, FMA build); its scalar
tail calls ``std::tanh`` (glibc).  ``torch.tanh`` is neither (MKL VML), and differs from SLEEF by
an ulp on about 1% of values.  SLEEF's tanh is evaluated here op by op:

    d = e^|x| as a double-word (SLEEF's expk2f / expk2: Cody–Waite reduction by a two-part ln 2,
        a minimax polynomial, the last terms in double-word arithmetic, scaling by 2^q),
    tanh|x| = (d − 1/d) / (d + 1/d) in double-word arithmetic, rounded once at the end,
    1 above 8.664339742 (float) / 18.714973875 (double), the sign of x put back, NaN kept.

The float and double versions differ beyond their constants: the double one evaluates e^|x|'s
polynomial by Estrin's scheme in single words, and adds the numerator and the denominator with
``add2`` (no magnitude assumption); the float one uses ``add``.  At the scalar tail positions
(manual.kernel_exp.vector_lanes) glibc's tanh is reached through ``math.tanh`` (float64) and
glibc's tanhf through its mirror in manual/glibc_float.py (float32): manual/libm_tail.py.
"""
import torch

from manual import double_word as dw
from manual.kernel_exp import vector_lanes
from manual.libm_tail import patch_tail

_R_LN2 = 1.442695040888963407359924681001892137426645954152985934135449406931
_F32 = {"ln2": (-0.693145751953125, -1.428606765330187045e-06),
        "poly": (0.1980960224e-3, 0.1394256484e-2, 0.8333456703e-2, 0.4166637361e-1),
        "c3": 0.166666659414234244790680580464, "one_above": 8.664339742}
_F64 = {"ln2": (-.69314718055966295651160180568695068359375,
                -.28235290563031577122588448175013436025525412068e-12),
        "poly": (0.1602472219709932072e-9, 0.2092255183563157007e-8, 0.2505230023782644465e-7,
                 0.2755724800902135303e-6, 0.2755731892386044373e-5, 0.2480158735605815065e-4,
                 0.1984126984148071858e-3, 0.1388888888886763255e-2, 0.8333333333333347095e-2,
                 0.4166666666666669905e-1),
        "c3": 0.1666666666666666574, "one_above": 18.714973875}


def _c(value, like):
    # a constant rounded to like's dtype, as the C literal (float literals carry an f suffix)
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _reduce(y, table):
    """q = rint(y/ln 2) and s = y − q·ln 2 as a double-word (the first lines of expk2f / expk2)."""
    q = torch.round(y * _c(_R_LN2, y))                    # rint: ties to even
    s = dw.add2_w_s((y, torch.zeros_like(y)), q * _c(table["ln2"][0], y))
    return q, dw.add2_w_s(s, q * _c(table["ln2"][1], y))


def _exp_word_f32(s):
    """The float polynomial of expk2f on s (Horner, FMA), then its double-word tail."""
    p = [_c(v, s[0]) for v in _F32["poly"]]
    u = p[0].expand_as(s[0])
    for coef in p[1:]:
        u = dw.fma(u, s[0], coef)
    t = dw.add2_w_s(dw.mul_w_s(s, u), _c(_F32["c3"], u))
    t = dw.add2_w_s(dw.mul_w_w(s, t), _c(0.5, u))
    t = dw.add2_w_w(s, dw.mul_w_w(dw.square(s), t))
    return dw.add_s_w(torch.ones_like(u), t)


def _exp_word_f64(s):
    """The double polynomial of expk2 (Estrin over s, s², s⁴, s⁸), then its double-word tail."""
    c = [_c(v, s[0]) for v in _F64["poly"]]
    s2 = dw.square(s)
    s4 = dw.square(s2)
    x, x2, x4 = s[0], s2[0], s4[0]
    x8 = x4 * x4
    pair = [dw.fma(x, c[i], c[i + 1]) for i in range(0, 10, 2)]   # POLY2 of each pair
    poly8 = dw.fma(x4, dw.fma(x2, pair[1], pair[2]), dw.fma(x2, pair[3], pair[4]))
    u = dw.fma(x8, pair[0], poly8)
    one = torch.ones_like(x)
    t = dw.add_s_w(_c(0.5, x), dw.mul_w_s(s, _c(_F64["c3"], x)))
    t = dw.add_s_w(one, dw.mul_w_w(t, s))
    t = dw.add_s_w(one, dw.mul_w_w(t, s))
    return dw.add_w_w(t, dw.mul_w_s(s4, u))


def _pow2(q):
    # 2^q for integer-valued q in [0, 127], written into the exponent bits (vpow2i)
    if q.dtype == torch.float32:
        return (torch.nan_to_num(q).to(torch.int32) + 127).bitwise_left_shift_(23).view(q.dtype)
    return (torch.nan_to_num(q).to(torch.int64) + 1023).bitwise_left_shift_(52).view(q.dtype)


def sleef_tanh(x):
    """tanh(x), elementwise, bit for bit as SLEEF's u10 tanh (xtanhf / xtanh, FMA build)."""
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x: expected float32 or float64, got {x.dtype}")
    table = _F32 if x.dtype == torch.float32 else _F64
    # |x| above the cut-off gives 1 below; clamping keeps 2^q finite (the values there are unused)
    y = torch.clamp(x.abs(), max=table["one_above"] + 1)
    q, s = _reduce(y, table)
    t = _exp_word_f32(s) if x.dtype == torch.float32 else _exp_word_f64(s)
    scale = _pow2(q)                                       # 0 <= q <= 28 below the cut-off
    d = (t[0] * scale, t[1] * scale)
    e = dw.reciprocal(d)
    add = dw.add_w_w if x.dtype == torch.float32 else dw.add2_w_w
    d = dw.divide(add(d, dw.neg(e)), add(d, e))
    r = d[0] + d[1]
    r = torch.where((x.abs() > _c(table["one_above"], x)) | r.isnan(), 1.0, r)
    r = torch.where(torch.signbit(x), -r, r)              # vmulsign: the sign of x on |tanh x|
    return torch.where(x.isnan(), x, r)


def kernel_tanh(x):
    """tanh as the CPU gelu_backward kernel computes it at each position of a contiguous x.

    Returns (t, lanes): lanes is the vector-lane mask shaped like x, or None where no lane is
    vectorized (non-contiguous x, CUDA, unknown CPU) — then t is the scalar tail's tanh throughout.
    """
    tail = torch.tanh(x.double()).to(x.dtype) if x.dtype == torch.float32 else torch.tanh(x)
    if x.device.type != "cpu" or not x.is_contiguous():
        return tail, None
    lanes = vector_lanes(x.numel(), x.dtype)
    if lanes is None:
        return tail, None
    lanes = lanes.view(x.shape)
    return patch_tail(torch.where(lanes, sleef_tanh(x), tail), x, lanes, "tanh"), lanes
