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
autograd's twin sees.  The backward passes are written by hand, three ways:
  * ``*_backward_textbook`` — the closed form as a lecture writes it (CS231n's
    ``batchnorm_backward_alt``, llm.c's ``layernorm_backward``): a few lines, correct to rounding,
    not bit-identical to autograd (tests/test_textbook_backwards.py grades it);
  * ``batchnorm_backward`` / ``layernorm_backward`` — the same closed form as the CPU kernels
    evaluate it, bit-identical to autograd: the sums and FMA contractions whose order decides the
    bits are one call each into manual/kernel_order.py, which names the kernel;
  * ``batchnorm_backward_steps`` — the step-by-step chain through the small ops of
    ``batchnorm_forward_steps`` (the CS231n / makemore computational graph); it matches autograd
    run over those same small ops.
"""
import math

import torch

from manual import _check, kernel_order
from manual.cache import Cache


class BatchNormCache(Cache):
    """What batchnorm_backward needs: x (N, D), weight (D,) or None, and mean, invstd the batch's
    μ, 1/σ (training) or the running statistics' (eval), per feature (D,)."""
    fields = ("x", "weight", "mean", "invstd", "training")
    __slots__ = fields


class LayerNormCache(Cache):
    """What layernorm_backward needs: x (N, D), weight (D,) or None, each row's μ, 1/σ (N,)."""
    fields = ("x", "weight", "mean", "invstd")
    __slots__ = fields


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
    return native_batchnorm(x, weight, bias, running_mean, running_var, training=training,
                            momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked)


def native_batchnorm(x, weight, bias, running_mean, running_var, *, training, momentum, eps,
                     num_batches_tracked=None):
    """batchnorm_forward after its argument checks: torch.native_batch_norm, the kernel
    nn.BatchNorm1d runs (with x in bfloat16/float16 and float32 parameters, as under autocast,
    its mixed-dtype kernel), and the cache; mean and 1/σ in the running statistics' dtype."""
    check_batch_rows(x, training)
    out, save_mean, save_invstd = torch.native_batch_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps)
    if training:
        mean, invstd = save_mean, save_invstd
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    else:
        mean = running_mean
        invstd = eval_invstd(running_var, eps, running_var.dtype)
    return out, BatchNormCache(x, weight, mean.clone(), invstd, training)


def check_batch_rows(x, training):
    """Batch norm in training mode needs at least 2 rows (nn.BatchNorm1d's rule)."""
    if training and x.shape[0] < 2:
        raise ValueError(f"x: batch norm in training mode needs at least 2 rows per batch, "
                         f"got shape {list(x.shape)}")


def eval_invstd(running_var, eps, dtype):
    """The batch norm kernel's eval 1/σ: 1 / std::sqrt(running_var[c] + eps) in double (eps is a
    double), per feature with the correctly rounded math.sqrt (torch.sqrt's MKL path is not
    always), rounded to dtype.  (D,) on running_var's device."""
    return torch.tensor([1 / math.sqrt(v + eps) for v in running_var.double().tolist()],
                        dtype=torch.float64).to(dtype=dtype, device=running_var.device)


def batchnorm_backward(dout, cache):
    """Fused closed-form backward.  dout (N, D) -> (dx (N, D), dweight (D,), dbias (D,)).

    dx = (1/σ)·weight·(dout − mean(dout) − x̂·mean(dout·x̂)) in training, (1/σ)·weight·dout in eval.
    Written as batch_norm_cpu_backward_channels_last_impl evaluates it (an (N, D) input is
    "NC11", channels last): k = dotp·(1/σ)·(1/σ)/N,  dx = (dy − Σdy/N − (x − μ)·k)·(1/σ)·weight;
    Σdy, dotp and the FMA in dx in the kernel's order (kernel_order.bn_column_sums, bn_dx_inner).
    Eval mode: 1/σ = 1/√(running_var + eps) formed in float64 (batchnorm_forward).
    """
    # dx = (w/σ)(dy − Σdy/N − (x−μ)·Σ(x−μ)dy/(Nσ²));  dweight = Σ(x−μ)dy/σ;  dbias = Σdy
    x, weight, mean, invstd, training = cache
    if dout.shape != x.shape:
        raise ValueError(f"dout: expected shape {list(x.shape)}, got {list(dout.shape)}")
    n = x.shape[0]
    w = weight if weight is not None else torch.ones_like(invstd)
    xc = x - mean
    sum_dy, dotp = kernel_order.bn_column_sums(xc, dout)         # Σₙ dy, Σₙ (x − μ)·dy
    dweight = dotp * invstd if weight is not None else None
    dbias = sum_dy if weight is not None else None
    if not training:
        return dout * invstd * w, dweight, dbias
    k = dotp * invstd * invstd / n
    grad_mean = sum_dy / n
    dx = kernel_order.bn_dx_inner(dout, grad_mean, xc, k) * invstd * w   # (dy − Σdy/N − xc·k)
    return dx, dweight, dbias


def batchnorm_backward_textbook(dout, cache):
    """The same closed form as CS231n's ``batchnorm_backward_alt`` writes it, in a few plain ops:
    correct to rounding, not bit-identical to autograd.  Same arguments and results as
    batchnorm_backward."""
    # dx = (1/(Nσ))·(N·dx̂ − Σdx̂ − x̂·Σ(dx̂·x̂)), dx̂ = dout·w;  dweight = Σ dout·x̂;  dbias = Σ dout
    x, weight, mean, invstd, training = cache
    w = weight if weight is not None else torch.ones_like(invstd)
    n = x.shape[0]
    xhat = (x - mean) * invstd
    dxhat = dout * w
    if training:
        dx = invstd / n * (n * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0))
    else:
        dx = dxhat * invstd
    if weight is None:
        return dx, None, None
    return dx, (dout * xhat).sum(0), dout.sum(0)


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
    return out, LayerNormCache(x, weight, mean.view(-1), rstd.view(-1))


def layernorm_backward(dout, cache):
    """dout (N, D) -> (dx (N, D), dweight (D,), dbias (D,)), as layer_norm_kernel.cpp evaluates
    the closed form (rstd = 1/σᵢ, per row):
        dx = rstd·w·dy + x_coef·x + const,
        x_coef = (Σⱼdy·w·μ − Σⱼdy·w·x)·rstd³/D,   const = −x_coef·μ − Σⱼdy·w·rstd/D
    with the compiler's contractions (each of the three lines below one FMA) and the row sums in
    the kernel's lane order (kernel_order.ln_row_sums); dweight, dbias sequential over rows
    (kernel_order.ln_param_grads).  Bitwise on AVX-512 and AVX2 (torch 2.13) for every width
    tried; other capabilities fall back to torch.sum (refnet/not_bitwise.py).
    """
    # dx = (1/σ)(w·dy − mean(w·dy) − x̂·mean(w·dy·x̂));  dweight = Σᵢ dy·x̂;  dbias = Σᵢ dy
    x, weight, mean, invstd = cache
    if dout.shape != x.shape:
        raise ValueError(f"dout: expected shape {list(x.shape)}, got {list(dout.shape)}")
    w = weight if weight is not None else torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    rstd = invstd.unsqueeze(1)
    mu = mean.unsqueeze(1)
    x_coef, const = layernorm_dx_coefficients(dout, x, w, mu, rstd)
    dx = torch.addcmul((rstd * dout) * w, x_coef.expand_as(x), x) + const
    if weight is None:
        return dx, None, None
    dweight, dbias = kernel_order.ln_param_grads(dout, x, mu, rstd)      # Σᵢ dy·x̂, Σᵢ dy
    return dx, dweight, dbias


def layernorm_dx_coefficients(dout, x, w, mu, rstd, work=None, plan=None):
    """(x_coef, const), each (N, 1), of layernorm_backward's dx = rstd·w·dy + x_coef·x + const
    (mu, rstd: (N, 1)), formed as layer_norm_kernel.cpp forms them (its FMA contractions; the row
    sums in its lane order; work: a buffer for them, plan: a kept LnRowSums for x's shape;
    kernel_order.ln_row_sums)."""
    sum_dyw_x, sum_dyw = kernel_order.ln_row_sums(dout, x, w, work, plan)  # Σⱼ dy·w·x, Σⱼ dy·w
    return layernorm_coefficients(sum_dyw_x, sum_dyw, mu, rstd, x.shape[1])


def layernorm_coefficients(sum_dyw_x, sum_dyw, mu, rstd, n):
    """(x_coef, const) from the two row sums (each (N, 1)), with the kernel's FMA contractions:
    x_coef = fma(Σdy·w, μ, −Σdy·w·x)·rstd³/n,  const = fma(−x_coef, μ, −Σdy·w·rstd/n)."""
    scale = 1.0 / n
    x_coef = torch.addcmul(-sum_dyw_x, sum_dyw, mu) * rstd * rstd * rstd * scale
    const = torch.addcmul(-(sum_dyw * rstd * scale), -x_coef, mu)
    return x_coef, const


def layernorm_backward_textbook(dout, cache):
    """The same closed form as llm.c's ``layernorm_backward`` (and CS231n) writes it, in a few
    plain ops: correct to rounding, not bit-identical to autograd.  Same arguments and results
    as layernorm_backward."""
    # dx = (1/σ)·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) per row, dx̂ = dout·w
    # dweight = Σ dout·x̂;  dbias = Σ dout
    x, weight, mean, invstd = cache
    rstd = invstd.unsqueeze(1)
    xhat = (x - mean.unsqueeze(1)) * rstd
    dxhat = dout * weight if weight is not None else dout
    dx = rstd * (dxhat - dxhat.mean(1, keepdim=True) - xhat * (dxhat * xhat).mean(1, keepdim=True))
    if weight is None:
        return dx, None, None
    return dx, (dout * xhat).sum(0), dout.sum(0)
