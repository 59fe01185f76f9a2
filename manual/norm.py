"""Batch normalization and layer normalization, each a forward/backward pair.

Shapes: x (N, D); weight/bias (D,); running_mean/running_var (D,); out (N, D).

Batch norm (``nn.BatchNorm1d``), per feature d over the batch:
    training:  μ = (1/N) Σₙ x,  σ² = (1/N) Σₙ (x − μ)²   (biased: this normalizes)
               x̂ = (x − μ) / √(σ² + eps),   out = weight·x̂ + bias
               running_mean ← (1 − momentum)·running_mean + momentum·μ
               running_var  ← (1 − momentum)·running_var  + momentum·σ²·N/(N − 1)   (unbiased)
               num_batches_tracked ← num_batches_tracked + 1
    eval:      x̂ = (x − running_mean) / √(running_var + eps)
Layer norm (``nn.LayerNorm(D)``), per row over the features: the same x̂ with μ, σ² (biased) taken
over the D features of each sample, and no running statistics.

The forward passes call torch's forward kernels (``torch.native_batch_norm``,
``torch.native_layer_norm``): the kernels' reductions for μ and σ² run in lanes and passes whose
order plain tensor ops cannot reproduce, and we want the very μ, 1/σ and running statistics
autograd's twin sees.  The backward passes are written by hand.

Two batch-norm backwards:
  * ``batchnorm_backward`` — the fused closed form (CS231n's ``batchnorm_backward_alt``), written
    as the CPU kernel evaluates it (aten/src/ATen/native/cpu/batch_norm_kernel.cpp,
    batch_norm_cpu_backward_channels_last_impl: an (N, D) input has image size 1, "NC11 is also
    channels last"):
        Σdy  = Σₙ dy                    sequential over rows, per thread chunk, in the dtype
        dotp = Σₙ (x − μ)·dy            the same, each step one FMA: dotp + (x − μ)·dy
        (chunks combined in float64: acc_type<float> is double on the CPU)
        dweight = dotp·(1/σ),  dbias = Σdy
        k = dotp·(1/σ)·(1/σ)/N,  dx = (dy − Σdy/N − (x − μ)·k)·(1/σ)·weight
    GCC contracts ``(dy − Σdy/N) − (x − μ)·k`` into one FMA in the vector body; the last
    ``D mod 8`` float32 / ``D mod 4`` float64 columns are not contracted — measured on AVX-512
    (part of its 16-lane masked tail) and on AVX2 (its whole 8-lane masked tail; torch 2.13).  We mirror both (see ``_bn_dx_fma_columns``).
    Eval mode: dx = dy·(1/σ)·weight with 1/σ = 1/√(running_var + eps) formed in float64.
  * ``batchnorm_backward_steps`` — the step-by-step chain through the small ops of
    ``batchnorm_forward_steps`` (mean, centre, square, variance, inverse std, scale, shift), the
    CS231n / makemore computational graph; it matches autograd run over those same small ops.
"""
import math

import torch

from manual import _check
from manual.kernel_exp import VECTOR_BITS


# --- batch norm: forward ---------------------------------------------------------------------
def batchnorm_forward(x, weight, bias, running_mean, running_var, *, training=True,
                      momentum=0.1, eps=1e-5, num_batches_tracked=None):
    """x (N, D) -> (out (N, D), cache).  Updates running_mean / running_var (and
    num_batches_tracked, a 0-d int64 tensor) in place in training mode, as nn.BatchNorm1d does.

    training: out = weight·(x − μ)/√(σ² + eps) + bias with batch μ, biased σ²; eval: with the
    running statistics.  Uses torch.native_batch_norm (the forward kernel nn.BatchNorm1d runs).
    """
    _check.norm_args(x, weight, bias, "batchnorm")
    for arg, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check.tensor(f"batchnorm.{arg}", t, ndim=1)
        _check.same("x", x, f"batchnorm.{arg}", t)
    if training and x.shape[0] < 2:
        raise ValueError(f"x: batch norm in training mode needs at least 2 rows per batch, "
                         f"got shape {list(x.shape)}")
    out, save_mean, save_invstd = torch.native_batch_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps)
    if training:
        mean, invstd = save_mean, save_invstd
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    else:
        mean = running_mean
        # the kernel's eval 1/σ: 1 / std::sqrt(running_var[c] + eps) in double (eps is a double),
        # per feature with the correctly rounded math.sqrt (torch.sqrt's MKL path is not always)
        invstd = torch.tensor([1 / math.sqrt(v + eps) for v in running_var.double().tolist()],
                              dtype=torch.float64).to(dtype=x.dtype, device=x.device)
    return out, (x, weight, mean.clone(), invstd, training)


def _thread_chunks(n):
    """Row ranges of at::parallel_for(0, n, grain 1) on OpenMP: ceil(n / threads) rows each."""
    threads = max(1, min(torch.get_num_threads(), n))
    size = -(-n // threads)
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _bn_sums(xc, dout):
    """(Σₙ dout, Σₙ xc·dout) per feature (xc = x − μ), in the kernel's order: sequential over the rows of
    each thread chunk in x's dtype (dotp with one FMA per step), then the chunk partials added in
    float64 starting from +0 (acc_type<float, false> is double) and rounded back."""
    zero = torch.zeros(xc.shape[1], dtype=xc.dtype, device=xc.device)
    total_s = torch.zeros(xc.shape[1], dtype=torch.float64, device=xc.device)
    total_d = torch.zeros_like(total_s)
    for begin, end in _thread_chunks(xc.shape[0]):
        s, d = zero, zero
        for i in range(begin, end):
            s = s + dout[i]
            d = torch.addcmul(d, xc[i], dout[i])       # dotp + (x − μ)·dy as one FMA
        total_s = total_s + s.double()
        total_d = total_d + d.double()
    return total_s.to(xc.dtype), total_d.to(xc.dtype)


# Width in bits of the trailing columns whose dx the kernel does not contract into an FMA,
# measured per CPU capability (torch 2.13, GCC build): AVX-512 the last D mod 256 bits (half its
# 512-bit vector); AVX2 the whole masked tail, D mod Vec::size() (its vector is 256 bits: 8
# float32, 4 float64), 1200 shapes x train/eval x 1-2 threads bitwise on an AMD EPYC.
_BN_PLAIN_TAIL_BITS = {"AVX512": 256, "AVX2": 256}


def _bn_dx_fma_columns(n_features, dtype, device):
    """How many leading columns the kernel evaluates with the contracted (FMA) dx formula.

    The kernel's loop takes Vec::size() columns at a time and then a masked tail of
    D mod Vec::size() columns.  Measured (``_BN_PLAIN_TAIL_BITS``): on AVX-512 all but the last
    D mod 8 float32 / D mod 4 float64 columns are contracted; on AVX2 all but the masked tail,
    which is the same D mod 8 / D mod 4.  Other capabilities are not measured: 128-bit halves
    of a 256-bit vector are assumed.
    """
    if device.type != "cpu":
        return n_features
    capability = torch.backends.cpu.get_cpu_capability()
    bits = _BN_PLAIN_TAIL_BITS.get(capability, VECTOR_BITS.get(capability, 256) // 2)
    lanes = bits // torch.finfo(dtype).bits
    return n_features - n_features % lanes


def batchnorm_backward(dout, cache):
    """Fused closed-form backward.  dout (N, D) -> (dx (N, D), dweight (D,), dbias (D,)).

    dx = (1/σ)·weight·(dout − mean(dout) − x̂·mean(dout·x̂)) in training, (1/σ)·weight·dout in eval.
    """
    # dx = (w/σ)(dy − Σdy/N − (x−μ)·Σ(x−μ)dy/(Nσ²));  dw = Σ(x−μ)dy/σ;  db = Σdy
    x, weight, mean, invstd, training = cache
    if dout.shape != x.shape:
        raise ValueError(f"dout: expected shape {list(x.shape)}, got {list(dout.shape)}")
    n = x.shape[0]
    w = weight if weight is not None else torch.ones_like(invstd)
    xc = x - mean
    sum_dy, dotp = _bn_sums(xc, dout)
    dweight = dotp * invstd if weight is not None else None
    dbias = sum_dy if weight is not None else None
    if not training:
        return dout * invstd * w, dweight, dbias
    k = dotp * invstd * invstd / n
    grad_mean = sum_dy / n
    fused = torch.addcmul(dout - grad_mean, xc, k, value=-1)   # one rounding: FMA
    split = _bn_dx_fma_columns(x.shape[1], x.dtype, x.device)
    if split < x.shape[1]:
        plain = dout - grad_mean - xc * k                       # two roundings
        fused = torch.cat([fused[:, :split], plain[:, split:]], 1)
    dx = fused * invstd * w
    return dx, dweight, dbias


# --- batch norm: the step-by-step graph --------------------------------------------------------
def batchnorm_forward_steps(x, weight, bias, eps=1e-5):
    """Training-mode batch norm as a chain of small ops (CS231n's staged graph, biased variance):
        mu = Σₙ x / N;  xc = x − mu;  sq = xc²;  var = Σₙ sq / N;  inv = (var + eps)^(−1/2)
        xhat = xc·inv;  out = weight·xhat + bias
    x (N, D) -> (out (N, D), cache).  Running statistics are not touched.
    """
    _check.norm_args(x, weight, bias, "batchnorm")
    n = x.shape[0]
    mu = x.sum(0, keepdim=True) / n
    xc = x - mu
    sq = xc ** 2
    var = sq.sum(0, keepdim=True) / n
    var_eps = var + eps
    inv = var_eps ** -0.5
    xhat = xc * inv
    out = weight * xhat + bias
    return out, (xc, var_eps, inv, xhat, weight, n)


def batchnorm_backward_steps(dout, cache):
    """Backward through the chain of batchnorm_forward_steps, one node at a time.
    dout (N, D) -> (dx (N, D), dweight (D,), dbias (D,))."""
    xc, var_eps, inv, xhat, weight, n = cache
    dbias = dout.sum(0)                                   # out = w·xhat + b  ⇒  db = Σ dout
    dweight = (dout * xhat).sum(0)                        # dw = Σ dout·xhat
    dxhat = dout * weight                                 # dxhat = dout·w
    dinv = (dxhat * xc).sum(0, keepdim=True)              # xhat = xc·inv  ⇒  dinv = Σ dxhat·xc
    dxc = dxhat * inv                                     #                  dxc = dxhat·inv
    dvar = dinv * (-0.5 * var_eps.pow(-1.5))              # inv = v^(−½)   ⇒  dv = −½ v^(−3/2)·dinv
    dsq = (dvar / n).expand_as(xc)                        # var = Σ sq / N ⇒  dsq = dvar/N
    dxc = dxc + dsq * (2.0 * xc)                          # sq = xc²       ⇒  dxc += 2·xc·dsq
    dmu = (-dxc).sum(0, keepdim=True)                     # xc = x − mu    ⇒  dmu = −Σ dxc
    dx = dxc + (dmu / n).expand_as(xc)                    # mu = Σ x / N   ⇒  dx = dxc + dmu/N
    return dx, dweight, dbias


# --- layer norm --------------------------------------------------------------------------------
def layernorm_forward(x, weight, bias, eps=1e-5):
    """x (N, D) -> (out (N, D), cache);  out = weight·(x − μᵢ)/√(σᵢ² + eps) + bias, per row i.
    Uses torch.native_layer_norm (nn.LayerNorm's forward kernel) for μᵢ and 1/σᵢ."""
    _check.norm_args(x, weight, bias, "layernorm")
    out, mean, rstd = torch.native_layer_norm(x, [x.shape[1]], weight, bias, eps)
    return out, (x, weight, mean.view(-1), rstd.view(-1))


def _ln_lanes(dtype, device):
    """Lanes of the vectors layer_norm_backward_frame reduces in: 256-bit ones (8 float32, 4
    float64), measured on AVX-512 and on AVX2 (AMD EPYC) with torch 2.13; 0 where not measured
    (plain sums)."""
    if device.type != "cpu" or torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX2"):
        return 0
    return 256 // torch.finfo(dtype).bits


def _ln_row_sum(factors, lanes):
    """Σⱼ Πfactors per row, as vec::map{2,3}_reduce_all sums it (a, b: (N, D) -> (N, 1)).

    D < lanes: left to right.  Otherwise a lanes-wide accumulator starts from the first chunk, adds
    each further full chunk (acc + product, two roundings), adds the partial last chunk with one
    FMA per lane (the compiler contracts that one), then folds the lanes: float32 by the shuffle
    tree (lane i + lane i^4, then i^2, then i^1), float64 left to right.
    """
    def prod(sl):
        out = factors[0][:, sl] * factors[1][:, sl]
        return out * factors[2][:, sl] if len(factors) == 3 else out

    n = factors[0].shape[1]
    if not lanes or n < lanes:
        if not lanes:
            return prod(slice(0, n)).sum(1, keepdim=True)
        terms = prod(slice(0, n))
        total = terms[:, :1]
        for j in range(1, n):
            total = total + terms[:, j:j + 1]
        return total
    acc = prod(slice(0, lanes))
    d = lanes
    while d + lanes <= n:
        acc = acc + prod(slice(d, d + lanes))
        d += lanes
    if d < n:
        r = n - d
        head = factors[0][:, d:] * factors[1][:, d:] if len(factors) == 3 else factors[0][:, d:]
        last = factors[-1][:, d:]
        acc = torch.cat([torch.addcmul(acc[:, :r], head, last), acc[:, r:]], 1)
    if factors[0].dtype == torch.float32:
        while acc.shape[1] > 1:
            half = acc.shape[1] // 2
            acc = acc[:, :half] + acc[:, half:]
        return acc
    total = acc[:, :1]
    for j in range(1, lanes):
        total = total + acc[:, j:j + 1]
    return total


def layernorm_backward(dout, cache):
    """dout (N, D) -> (dx (N, D), dweight (D,), dbias (D,)), in the terms of layer_norm_kernel.cpp
    (a = 1/σᵢ, scale = 1/D, per row: ds = Σⱼ dy·x·w, db = Σⱼ dy·w):
        b = (db·μ − ds)·a³·scale,  c = −b·μ − db·a·scale,  dx = a·dy·w + b·x + c
        dweight = Σᵢ dy·(a·x − a·μ),  dbias = Σᵢ dy   (sequential over rows per thread chunk)
    with the compiler's contractions: db·μ − ds, −b·μ − (db·a·scale) and (a·dy·w) + b·x are each
    one FMA, and the row sums ds, db in the kernel's lane order (``_ln_row_sum``).  Measured
    bitwise on AVX-512 and AVX2 (torch 2.13) for every width tried (1–19, 31, 33, 37, 64, 100,
    257; 1 and 2 threads); other capabilities fall back to
    torch.sum (refnet/not_bitwise.py).  dweight and dbias are sequential over rows.
    """
    # dx = (1/σ)(w·dy − mean(w·dy) − x̂·mean(w·dy·x̂));  dw = Σᵢ dy·x̂;  db = Σᵢ dy
    x, weight, mean, rstd = cache
    if dout.shape != x.shape:
        raise ValueError(f"dout: expected shape {list(x.shape)}, got {list(dout.shape)}")
    w = weight if weight is not None else torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    scale = 1.0 / x.shape[1]
    a = rstd.unsqueeze(1)
    mu = mean.unsqueeze(1)
    wn = w.expand_as(x)
    lanes = _ln_lanes(x.dtype, x.device)
    ds = _ln_row_sum((dout, x, wn), lanes)                     # Σⱼ dy·x·w
    db = _ln_row_sum((dout, wn), lanes)                        # Σⱼ dy·w
    b = torch.addcmul(-ds, db, mu) * a * a * a * scale         # fma(db, μ, −ds)·a³·scale
    c = torch.addcmul(-(db * a * scale), -b, mu)               # fma(−b, μ, −db·a·scale)
    dx = torch.addcmul((a * dout) * w, b.expand_as(x), x) + c  # fma(b, x, a·dy·w) + c
    dweight = dbias = None
    if weight is not None:
        zero = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
        gw, gb = zero, zero  # the chunk partials are added in opmath (float for float32)
        shift = -a * mu
        for begin, end in _thread_chunks(x.shape[0]):
            pw, pb = zero, zero
            for i in range(begin, end):
                pw = torch.addcmul(pw, dout[i], torch.addcmul(shift[i], a[i], x[i]))
                pb = pb + dout[i]
            gw, gb = gw + pw, gb + pb
        dweight, dbias = gw, gb
    return dx, dweight, dbias
