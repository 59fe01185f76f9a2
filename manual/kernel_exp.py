"""eˣ as PyTorch's CPU ``elu_backward`` kernel evaluates it, written out in plain tensor ops.

``torch.exp`` on an MKL build calls MKL VML (vsExp/vdExp).  The fused elu_backward kernel does not:
its vector lanes call SLEEF's ``Sleef_expf16_u10`` / ``Sleef_expd8_u10`` (AVX-512; the ``f8``/``d4``
variants on AVX2 — same algorithm), and its scalar tail calls ``std::exp`` (glibc).  The three
round differently in about 1 element in 20, by 1 ulp.  To give ELU a manual backward that is
bit-identical to autograd we evaluate SLEEF's algorithm op by op (range reduction by Cody–Waite
with a two-part ln 2, the minimax polynomial with fused multiply-adds, scaling by 2^q in two
exact steps), and use it at the positions the kernel computes in vector lanes.

FMA: ``torch.addcmul(c, a, b)`` is one fused multiply-add on x86 CPUs (its kernel's
``self + value*t1*t2`` is contracted by the compiler; measured bit-identical to SLEEF's vfmadd).

Which positions are vector lanes (cpu_kernel_vec, ATen/native/cpu/Loops.h): elements are split
into at::parallel_for chunks (one chunk below GRAIN_SIZE = 32768 elements or with one thread,
else ceil(n / threads) each); inside a chunk the loop takes 2·Vec::size() elements at a time and
the remainder (< 2·Vec::size()) goes to the scalar lambda with ``std::exp``: glibc's exp, which
float64 reaches through Python's ``math.exp`` (manual/libm_tail.py: bitwise).  float32's expf is
not reachable by plain ops; at those tail positions we use eˣ in float64 rounded once, which
differs from glibc by ≤ 1 ulp on ~0.07% of values — measured on torch 2.13, glibc x86-64.  Shapes whose element count is
a multiple of 2·Vec::size() per chunk (32 floats / 16 doubles on AVX-512) have no tail at all.
"""
import math

import torch

from manual.libm_tail import patch_tail

GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE
VECTOR_BITS = {"AVX512": 512, "AVX2": 256}   # ATen vector width by CPU capability
_LOG2E = 1.442695040888963407359924681001892137426645954152985934135449406931


def _fma(a, b, c):
    # a·b + c with one rounding
    return torch.addcmul(c, a, b)


def _pow2_float64(k):
    # 2^k for integer-valued k in [−1022, 1023], written into a float64's exponent bits
    return (k.to(torch.int64) + 1023).bitwise_left_shift_(52).view(torch.float64)


def _scale_by_pow2(u, q):
    # u·2^q in two exact steps, as SLEEF's vldexp2 (keeps 2^(q/2) finite for every q it sees).
    # float64 only: for x in the caller's [low, high], q ∈ [−1443, 1024], so both halves are
    # normal powers of two; outside it the caller's selects decide (u may be anything there).
    q = torch.nan_to_num(q, nan=0.0).clamp(-2200.0, 2200.0)
    half = torch.floor(q / 2)
    return u * _pow2_float64(half) * _pow2_float64(q - half)


_F32_POLY = (0.000198527617612853646278381, 0.00139304355252534151077271,
             0.00833336077630519866943359, 0.0416664853692054748535156,
             0.166666671633720397949219, 0.5)
_F32_LN2 = (-0.693145751953125, -1.428606765330187045e-06)
_F64_LN2 = (-.69314718055966295651160180568695068359375,
            -.28235290563031577122588448175013436025525412068e-12)
_F64_POLY = (0.2081276378237164457e-8, 0.2511210703042288022e-7, 0.2755762628169491192e-6,
             0.2755723402025388239e-5, 0.2480158687479686264e-4, 0.1984126989855865850e-3,
             0.1388888888914497797e-2, 0.8333333333314938210e-2, 0.4166666666666602598e-1,
             0.1666666666666669072e+0)
_constants = {}


def _constant_tensors(dtype, device):
    """SLEEF's constants as 0-d tensors of dtype on device, made once per (dtype, device)."""
    key = (dtype, device)
    if key not in _constants:
        values = (_LOG2E,) + ((_F32_LN2 + _F32_POLY) if dtype == torch.float32
                              else (_F64_LN2 + _F64_POLY + (0.5, 1.0)))
        _constants[key] = [torch.tensor(v, dtype=dtype, device=device) for v in values]
    return _constants[key]


def sleef_exp(x):
    """eˣ, elementwise, bit for bit as SLEEF's u10 exp (xexpf / xexp, FMA build).  x: any shape."""
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x: expected float32 or float64, got {x.dtype}")
    if x.dtype == torch.float32:
        return SleefExpFloat32(x.shape, x.device)(x)
    k = _constant_tensors(x.dtype, x.device)
    q = torch.round(x * k[0])                            # rint: ties to even, as vrint
    s = _fma(q, k[1], x)                                 # x − q·ln2 (upper part)
    s = _fma(q, k[2], s)                                 #          − q·ln2 (lower part)
    c = k[3:]
    s2 = s * s
    s4 = s2 * s2
    s8 = s4 * s4
    u = _fma(s8, _fma(s, c[0], c[1]),
             _fma(s4, _fma(s2, _fma(s, c[2], c[3]), _fma(s, c[4], c[5])),
                  _fma(s2, _fma(s, c[6], c[7]), _fma(s, c[8], c[9]))))
    u = _fma(u, s, c[10])                                # Estrin above, Horner for the last three
    u = _fma(u, s, c[11])
    u = _fma(u, s, c[11])
    low, high = -1000.0, 709.78271289338397              # 0x1.62e42fefa39efp+9
    u = _scale_by_pow2(u, q)
    u = torch.where(x > high, math.inf, u)
    return torch.where(x < low, 0.0, u)


class SleefExpFloat32:
    """SLEEF's float32 u10 exp for inputs of one shape, into buffers allocated once (17 ops, no
    allocation per call; ``sleef_exp`` makes one per call, the fast step keeps one).

    Range: SLEEF gives +inf above 100 and +0 below −104; here x is clamped to [−105, 101] first,
    and the same algorithm gives those values there by itself (e^101 overflows float32 when
    rounded; e^x < 0.98·2^−150 rounds to +0 below −104), so one clamp replaces the two selects;
    NaN passes through.  Scaling by 2^q (|q| ≤ 150): u·2^q is exact in float64, so one float64
    product rounded once to float32 is the correctly rounded product that vldexp2's exact first
    step and rounding second step give; 2^q is written into a float64's exponent bits
    ((q + 1023) << 52; pow is a slow scalar loop).  Buffers: three of the shape in float32, one
    in int64 (the exponent bits)."""

    def __init__(self, shape, device):
        new = lambda dtype: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
        self.a, self.b, self.c = new(torch.float32), new(torch.float32), new(torch.float32)
        self.bits = new(torch.int64)
        self.two_q = self.bits.view(torch.float64)
        self.k = _constant_tensors(torch.float32, device)

    def buffers(self):
        return [self.a, self.b, self.c, self.bits]

    def __call__(self, x, out=None):
        """eˣ into out (default: a new tensor; it may be the buffer c); x is not written."""
        k, a, b, c = self.k, self.a, self.b, self.c
        torch.clamp(x, -105.0, 101.0, out=a)
        q = torch.mul(a, k[0], out=b).round_()           # rint: ties to even, as vrint
        self.bits.copy_(q).add_(1023).bitwise_left_shift_(52)   # 2^q as float64 bits
        s = torch.addcmul(a, q, k[1], out=a)             # x − q·ln2 (upper part), one FMA
        s.addcmul_(q, k[2])                              #          − q·ln2 (lower part)
        u = torch.addcmul(k[4], k[3], s, out=b)          # Horner, one FMA per coefficient
        for coef in k[5:9]:
            torch.addcmul(coef, u, s, out=u)
        s2 = torch.mul(s, s, out=c)
        torch.addcmul(s, s2, u, out=u).add_(1.0)         # 1 + (s + s²·P(s))
        return torch.mul(u, self.two_q, out=torch.empty_like(x) if out is None else out)


def vector_lanes(numel, dtype):
    """Bool mask (numel,): True where cpu_kernel_vec computes a contiguous elementwise op in vector
    lanes, False in the scalar tail of each chunk.  None when this CPU build has no known vector
    width (then every element takes the scalar path)."""
    bits = VECTOR_BITS.get(torch.backends.cpu.get_cpu_capability())
    if bits is None:
        return None
    step = 2 * (bits // (8 * torch.empty((), dtype=dtype).element_size()))
    threads = torch.get_num_threads()
    if numel < GRAIN_SIZE or threads == 1:
        chunk = max(numel, 1)
    else:
        n_threads = min(threads, -(-numel // GRAIN_SIZE))
        chunk = -(-numel // n_threads)
    idx = torch.arange(numel)
    start = (idx // chunk) * chunk
    length = torch.clamp(numel - start, max=chunk)
    return (idx - start) < (length // step) * step


def kernel_exp(x):
    """eˣ as the CPU elu_backward kernel computes it at each position of a contiguous x.

    Returns (e, lanes): lanes is the vector-lane mask shaped like x, or None where no lane is
    vectorized (non-contiguous x, CUDA, unknown CPU) — then e is torch.exp(x) throughout.
    """
    if x.device.type != "cpu" or not x.is_contiguous():
        return torch.exp(x), None
    lanes = vector_lanes(x.numel(), x.dtype)
    tail = torch.exp(x.double()).to(x.dtype) if x.dtype == torch.float32 else torch.exp(x)
    if lanes is None:
        return tail, None
    lanes = lanes.view(x.shape)
    return patch_tail(torch.where(lanes, sleef_exp(x), tail), x, lanes, "exp"), lanes
