"""Mixed precision: an MLP step as ``torch.autocast("cpu", dtype)`` runs it, every cast written out.

The parameters stay float32 ("master weights"); autocast runs the GEMMs in a low dtype L
(bfloat16 or float16) and the losses in float32.  On the CPU (aten/src/ATen/autocast_mode.cpp,
the AutocastCPU lists):
    lower precision  linear / addmm / mm / matmul: float32 inputs are cast to L first
    float32          mse_loss, cross_entropy_loss, nll_loss, multi_margin_loss: cast up first
    untouched        everything else (the activations, dropout, embedding, pow, sum, the norms):
                     it runs in whatever dtype it receives, so a hidden activation runs in L,
                     and layer norm runs its mixed-dtype kernel (L input, float32 weight/bias)
A cast's backward is the cast back, so every parameter gradient is computed in L and cast up to
float32 at its leaf; the optimizers then run in float32, unchanged (manual/optim.py).

One layer, forward and backward (· marks where the dtype changes):
    h (L, or float32 for x / the embedding) ·→ L ─┐
    W (float32) ·→ L,  b (float32) ·→ L ─────────┴→ z = addmm(b, h, Wᵀ) in L → activation in L
    dz (L) → dh = dz·W, dW = dzᵀ·h, db = Σₙ dz  all in L;  dW ·→ float32,  db ·→ float32
The last layer's output is cast up (·→ float32) for the loss; the loss's gradient is cast down
(·→ L) at the same place.  What decided the bits, op by op: docs/bit-exactness.md (mixed
precision); each rule below says it where it applies.

Traps mirrored here (torch's behaviour, measured):
  - autocast casts each float32 weight once per region and caches the copy: a training script
    enters autocast once per step, so ``AutocastMLP`` casts the weights afresh every forward.
  - L2 regularization's ``W.pow(2)`` runs on the float32 weight (pow is in no list): float32.
"""
import torch

from manual.activations import ACTIVATIONS, activation_forward
from manual.cache import record
from manual.clip import clip_grad_norm
from manual.dropout import dropout_backward, dropout_forward
from manual.embedding import embedding_backward, embedding_forward
from manual.layers import linear_backward, linear_forward, linear_param_grads
from manual.losses import l2_backward, l2_forward, loss_backward, loss_forward
from manual.kernel_order import (bn_column_sums, bn_mixed_dx_inner, ln_mixed_param_grads,
                                 ln_mixed_row_sums)
from manual.norm import LayerNormCache, layernorm_coefficients, native_batchnorm
from manual.step import accumulate_grads, micro_batch_seed

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(dtype):
    """A name of AUTOCAST_DTYPES or the torch dtype itself -> the torch dtype; else ValueError."""
    for name, t in AUTOCAST_DTYPES.items():
        if dtype in (name, t):
            return t
    raise ValueError(f"autocast: unknown dtype {dtype!r}; expected one of "
                     f"{', '.join(AUTOCAST_DTYPES)}")



# --- the cast --------------------------------------------------------------------------------
def cast_forward(x, dtype):
    """x -> x in dtype (round to nearest even, as _to_copy), cache: x's own dtype."""
    return x.to(dtype), x.dtype


def cast_backward(dout, from_dtype):
    # out = cast(x)  ⇒  dx = cast back(dout): one rounding (none when going up)
    return dout.to(from_dtype)


# --- linear under autocast ------------------------------------------------------------------
def autocast_linear_forward(h, weight, bias, dtype):
    """h (N, D) any float dtype, weight (H, D) / bias (H,) float32 -> out (N, H) in dtype, cache.

    Bits: autocast casts the three inputs to L and calls the same addmm (bias inside the GEMM);
    the GEMM is L's own kernel (measured: emulating it in float32 is not the same), so it is
    called, not re-expressed.  An h already in L is not cast (no copy, no cast in the backward).
    """
    h_low, h_dtype = cast_forward(h, dtype)
    weight_low, weight_dtype = cast_forward(weight, dtype)
    bias_low = None if bias is None else cast_forward(bias, dtype)[0]
    out, cache = linear_forward(h_low, weight_low, bias_low)
    return out, (cache, h_dtype, weight_dtype)


def autocast_linear_backward(dout, cache, input_grad=True, low=None):
    """dout (N, H) in L -> dh (N, D) in h's dtype, dweight (H, D) and dbias (H,) float32.
    input_grad False: dh is None (not computed: a first layer's, which a step never uses).

    Bits: the product and the bias sum run in L (linear_backward on the L copies), then each
    gradient is cast up once at its leaf.  Summing the bias gradient in float32 instead differs.
    low: a dict to keep the three L gradients in (input, weight, bias) before their casts, or None.
    """
    # out = h·Wᵀ + b in L  ⇒  dh, dW, db as linear_backward, in L;  each cast's backward casts back
    lin_cache, h_dtype, weight_dtype = cache
    if input_grad:
        dh_low, dweight_low, dbias_low = linear_backward(dout, lin_cache)
    else:
        dh_low, (dweight_low, dbias_low) = None, linear_param_grads(dout, lin_cache)
    if low is not None:
        low.update(input=dh_low, weight=dweight_low, bias=dbias_low)
    dbias = None if dbias_low is None else cast_backward(dbias_low, weight_dtype)
    dh = None if dh_low is None else cast_backward(dh_low, h_dtype)
    return dh, cast_backward(dweight_low, weight_dtype), dbias


# --- activations in the low dtype -------------------------------------------------------------
def _in_float32(name):
    """The activation's float32 backward on cast-up inputs, rounded to L once at the end."""
    backward = ACTIVATIONS[name][1]

    def low_precision(dout, cache):
        up = tuple(c.float() if isinstance(c, torch.Tensor) else c for c in cache) \
            if isinstance(cache, tuple) else cache.float()
        return backward(dout.float(), up).to(dout.dtype)
    return low_precision


def _in_low(name):
    """The activation's backward as written, every op in L."""
    return ACTIVATIONS[name][1]


# name -> {L: backward}.  How the CPU kernel evaluates each backward on L tensors (measured on
# 100 003 random elements against autograd: 0 differ with this rule, the other rule differs in
# 13–55% of them):
#   relu, maxout, identity   a select / scatter: no arithmetic, any dtype gives the same bits
#   leaky_relu               dout·slope: one product, rounded once to L either way
#   tanh, elu                the kernel converts to float32, computes, rounds once to L
#   sigmoid                  bfloat16: float32 inside, one rounding; float16: the generic
#                            kernel, rounded to float16 after every op (dout·(1 − y)·y in L)
AUTOCAST_BACKWARD = {
    "relu": {torch.bfloat16: _in_low("relu"), torch.float16: _in_low("relu")},
    "maxout": {torch.bfloat16: _in_low("maxout"), torch.float16: _in_low("maxout")},
    "identity": {torch.bfloat16: _in_low("identity"), torch.float16: _in_low("identity")},
    "leaky_relu": {torch.bfloat16: _in_low("leaky_relu"), torch.float16: _in_low("leaky_relu")},
    "tanh": {torch.bfloat16: _in_float32("tanh"), torch.float16: _in_float32("tanh")},
    "elu": {torch.bfloat16: _in_float32("elu"), torch.float16: _in_float32("elu")},
    "sigmoid": {torch.bfloat16: _in_float32("sigmoid"), torch.float16: _in_low("sigmoid")},
}


# CUDA (read from the source, not measured here): the elementwise backward kernels compute in
# opmath_t = float for bfloat16 and float16 alike and round once to L, so every rule is float32
# inside; sigmoid's float16 exception is a CPU kernel's.  The kernels' own float arithmetic
# (nvcc's contractions, the device exp) still differs: CUDA is graded at a tolerance tier
# (refnet/not_bitwise.py, "autocast:*").
AUTOCAST_BACKWARD_CUDA = {name: {torch.bfloat16: _in_float32(name), torch.float16: _in_float32(name)}
                          for name in AUTOCAST_BACKWARD}


def autocast_rules(device_type):
    """The activation backward rules autocast's kernels follow on a device type: name -> {L: fn}."""
    return AUTOCAST_BACKWARD_CUDA if device_type == "cuda" else AUTOCAST_BACKWARD


def autocast_activation_backward(name, dout, cache):
    """dout in L -> dx in L, as autograd's kernel for that activation computes it on L tensors
    on dout's device (autocast_rules)."""
    try:
        return autocast_rules(dout.device.type)[name][dout.dtype](dout, cache)
    except KeyError:
        raise ValueError(f"autocast: activation {name!r} with dtype {dout.dtype} is not "
                         f"mirrored") from None


# --- layer norm under autocast ------------------------------------------------------------------
# layer_norm is in no AutocastCPU list: it receives the L activations with its float32 weight and
# bias, and the CPU runs a mixed-dtype kernel (layer_norm_kernel.cpp, <T = L, param float>): the
# statistics and the output in float, the output rounded to L; its backward computes dx in
# float from the cast-up inputs (its own lane order) and rounds once, but keeps dweight/dbias
# per thread in a buffer of L, rounded after every row (kernel_order.ln_mixed_*).
def autocast_layernorm_forward(h, weight, bias, eps):
    """h (N, D) in L, weight/bias (D,) float32 -> out (N, D) in L, cache (float32 mean, rstd).
    The mixed forward kernel is called, as manual.norm.layernorm_forward calls the float one."""
    out, mean, rstd = torch.native_layer_norm(h, [h.shape[1]], weight, bias, eps)
    return out, LayerNormCache(h, weight, mean.view(-1), rstd.view(-1))


def autocast_layernorm_backward(dout, cache):
    """dout (N, D) in L -> dx (N, D) in L, dweight (D,), dbias (D,) float32."""
    # dx = (1/σ)(w·dy − mean(w·dy) − x̂·mean(w·dy·x̂)) in float, one rounding to L;
    # dweight = Σᵢ dy·x̂, dbias = Σᵢ dy, each row's term rounded into an L buffer
    x, weight, mean, invstd = cache
    xf, dyf = x.float(), dout.float()
    rstd, mu = invstd.unsqueeze(1), mean.unsqueeze(1)
    x_coef, const = layernorm_coefficients(*ln_mixed_row_sums(dyf, xf, weight), mu, rstd,
                                           x.shape[1])
    dx = torch.addcmul((rstd * dyf) * weight, x_coef.expand_as(xf), xf) + const
    return (dx.to(dout.dtype),) + ln_mixed_param_grads(dout, x, mu, rstd)


# --- batch norm under autocast ------------------------------------------------------------------
# batch_norm is in no AutocastCPU list either: the L activations meet float32 weight, bias and
# running statistics, and batch_norm_kernel.cpp runs its mixed-dtype kernel (channels last,
# <T = L, param float>): statistics, running-statistic updates and the output in float, the
# output rounded to L; its backward keeps float partials per thread chunk and adds them in float
# (not double), and evaluates dx per L vector (2·float lanes), contracted or not by L, the scalar
# tail with one FMA (kernel_order.bn_mixed_dx_inner).
def autocast_batchnorm_forward(h, weight, bias, running_mean, running_var, **settings):
    """h (N, D) in L; weight, bias and the running statistics (D,) float32 (updated in place in
    training, as nn.BatchNorm1d) -> out (N, D) in L, cache.  The mixed kernel is called
    (manual.norm.native_batchnorm; settings: training, momentum, eps, num_batches_tracked)."""
    return native_batchnorm(h, weight, bias, running_mean, running_var, **settings)


def autocast_batchnorm_backward(dout, cache):
    """dout (N, D) in L -> dx (N, D) in L, dweight (D,), dbias (D,) float32."""
    # dx = (w/σ)(dy − Σdy/N − (x−μ)·Σ(x−μ)dy/(Nσ²)) in float, one rounding to L;
    # dweight = Σ(x−μ)dy/σ, dbias = Σdy, float partials per thread chunk added in float
    x, weight, mean, invstd, training = cache
    xc, dyf = x.float() - mean, dout.float()
    sum_dy, dotp = bn_column_sums(xc, dyf, torch.float32)
    if training:
        k = dotp * invstd * invstd / x.shape[0]
        dx = bn_mixed_dx_inner(dyf, sum_dy / x.shape[0], xc, k, x.dtype) * invstd * weight
    else:
        dx = dyf * invstd * weight
    return dx.to(dout.dtype), dotp * invstd, sum_dy


# --- what is refused ---------------------------------------------------------------------------
REFUSED = {
    "blocks": ("blocks under autocast: not mirrored yet (the residual blocks' linears, layer "
               "norm and add would need autocast's casts written out); use autocast null or "
               "remove blocks"),
}


def check_autocast_mlp(net, dtype):
    """One-line ValueError for a manual MLP that autocast cannot run here: float64 (or other
    non-float32) parameters, an activation without an AUTOCAST_BACKWARD rule.
    Returns the torch dtype."""
    dtype = autocast_dtype(dtype)
    first = net.params["layers.0.weight"]
    if first.dtype != torch.float32:
        raise ValueError(f"autocast: needs float32 parameters (the master weights), got "
                         f"{str(first.dtype).replace('torch.', '')}; autocast casts only float32 "
                         f"tensors, so a {str(first.dtype).replace('torch.', '')} net would run "
                         f"unchanged")
    if net.blocks is not None:
        raise ValueError(REFUSED["blocks"])
    for name in net.activations:
        if name not in AUTOCAST_BACKWARD:
            raise ValueError(f"autocast: activation {name!r} is not mirrored under autocast")
    return dtype


class AutocastMLP:
    """A manual MLP's training step under autocast: the net's float32 parameters, activations,
    loss, reg, dropout, embedding and optimizer, with the casts autocast inserts.

    net: a manual.mlp.MLP with float32 parameters; dtype: "bfloat16" / "float16" (or the torch
    dtype).  The net's own forward/backward are untouched; this class runs the same ops in L.
    """

    def __init__(self, net, dtype):
        self.dtype = check_autocast_mlp(net, dtype)
        self.net = net

    def _weights(self):
        """The float32 weights, layer by layer (what L2 regularizes)."""
        return [self.net.params[f"layers.{i}.weight"] for i in range(self.net.n_layers)]

    def _linear(self, i, h, trace=None):
        p = self.net.params
        out, cache = autocast_linear_forward(h, p[f"layers.{i}.weight"], p.get(f"layers.{i}.bias"),
                                             self.dtype)
        if trace is not None:         # the L copies the GEMM read (an h already in L: no cast)
            (h_low, weight_low, _), h_dtype, _ = cache
            if h_dtype != self.dtype:
                trace[f"casts.layers.{i}.input"] = h_low
            trace[f"casts.layers.{i}.weight"] = weight_low
            if f"layers.{i}.bias" in p:
                trace[f"casts.layers.{i}.bias"] = cast_forward(p[f"layers.{i}.bias"], self.dtype)[0]
        return out, cache

    def _norm(self, i, h):
        """Norm i on the L activations h (float32 weight, bias, running statistics)."""
        net = self.net
        w, b = net.params[f"norms.{i}.weight"], net.params[f"norms.{i}.bias"]
        if net.norm == "layernorm":
            return autocast_layernorm_forward(h, w, b, net.eps)
        buffers = net.buffers
        return autocast_batchnorm_forward(
            h, w, b, buffers[f"norms.{i}.running_mean"], buffers[f"norms.{i}.running_var"],
            training=net.training, momentum=net.momentum, eps=net.eps,
            num_batches_tracked=buffers[f"norms.{i}.num_batches_tracked"])

    def predict(self, x, trace=None):
        """x (N, D) float32 (or (N, T) tokens) -> output (N, C) in L, caches.

        trace: a dict to record in, or None: casts.layers.{i}.input / .weight / .bias (the L
        copies each GEMM reads), layers.{i}.pre_activation and layers.{i}.activation (in L; with
        a norm layers.{i}.linear before it, as manual.mlp names them); forward adds output (L) and
        loss (float32), backward grad_output (float32), grad_output_low, layers.{i}.grad_activation
        / grad_pre_activation (/ grad_linear after a norm), casts.layers.{i}.grad_input /
        grad_weight / grad_bias (L, before their casts up) and grad_input (x's dtype)."""
        net = self.net
        net.check_input(x)
        h, emb_cache = x, None
        if net.embedding is not None:       # nn.Embedding is in no autocast list: float32
            emb, emb_cache = embedding_forward(x, net.params["embed.weight"])
            h = emb.view(emb.shape[0], -1)
        caches = []
        for i in range(net.n_layers):
            h, lin_cache = self._linear(i, h, trace)
            norm_cache = act_cache = drop_cache = None
            if i < net.n_layers - 1 and net.norm is not None:   # as manual.mlp's trace names
                record(trace, f"layers.{i}.linear", h)
                h, norm_cache = self._norm(i, h)      # in no list: the mixed kernel, out in L
            record(trace, f"layers.{i}.pre_activation", h)
            if i < net.n_layers - 1:
                act = net.activations[i]
                options = {key: net.options[key] for key in ACTIVATIONS[act][2]}
                h, act_cache = activation_forward(act, h, **options)               # in L
                record(trace, f"layers.{i}.activation", h)
                h, drop_cache = dropout_forward(h, net.dropout, training=net.training,
                                                generator=net.generator)        # mask in L
            caches.append((lin_cache, norm_cache, act_cache, drop_cache))
        return h, (caches, emb_cache)

    def forward(self, x, target, trace=None):
        """-> float32 scalar loss (data loss on the output cast up, + float32 L2), cache."""
        out_low, caches = self.predict(x, trace)
        out, out_dtype = cast_forward(out_low, torch.float32)   # the loss runs in float32
        loss, loss_cache = loss_forward(self.net.loss, out, target)
        if self.net.reg:
            loss = loss + l2_forward(self._weights(), self.net.reg)   # on the float32 W
        record(trace, "output", out_low)
        record(trace, "loss", loss)
        return loss, (caches, loss_cache, out_dtype)

    def backward(self, cache, dloss=None, trace=None):
        """cache from forward, dloss (float32 scalar; default 1, a GradScaler's seed S) ->
        float32 grads by parameter name (the net's order)."""
        (layer_caches, emb_cache), loss_cache, out_dtype = cache
        net = self.net
        if dloss is None:
            dloss = torch.ones((), dtype=torch.float32, device=net.params["layers.0.weight"].device)
        dout = loss_backward(net.loss, dloss, loss_cache)            # float32
        record(trace, "grad_output", dout)
        dh = cast_backward(dout, out_dtype)                          # ·→ L
        record(trace, "grad_output_low", dh)
        grads = {}
        for i in reversed(range(net.n_layers)):
            lin_cache, norm_cache, act_cache, drop_cache = layer_caches[i]
            if i < net.n_layers - 1:
                if net.dropout:
                    record(trace, f"layers.{i}.grad_dropout", dh)
                dh = dropout_backward(dh, drop_cache)
                record(trace, f"layers.{i}.grad_activation", dh)
                dh = autocast_activation_backward(net.activations[i], dh, act_cache)
            record(trace, f"layers.{i}.grad_pre_activation", dh)
            if norm_cache is not None:
                norm_backward = autocast_layernorm_backward if net.norm == "layernorm" \
                    else autocast_batchnorm_backward
                dh, grads[f"norms.{i}.weight"], grads[f"norms.{i}.bias"] = \
                    norm_backward(dh, norm_cache)
                record(trace, f"layers.{i}.grad_linear", dh)
            # x's own gradient is never used by a step; a trace (the fixtures) records it
            input_grad = i > 0 or emb_cache is not None or trace is not None
            low = None if trace is None else {}
            dh, grads[f"layers.{i}.weight"], dbias = autocast_linear_backward(dh, lin_cache,
                                                                              input_grad, low)
            if dbias is not None:
                grads[f"layers.{i}.bias"] = dbias
            for part, t in (low or {}).items():
                if t is not None and (part != "input" or t is not dh):
                    trace[f"casts.layers.{i}.grad_{part}"] = t
        if emb_cache is not None:       # dh came back up to float32 through the first cast
            idx = emb_cache.idx
            grads["embed.weight"] = embedding_backward(dh.view(*idx.shape, -1), emb_cache)
        if net.reg:   # W's second use, in float32: added to the cast-up data gradient
            for i, dweight_reg in enumerate(l2_backward(dloss, self._weights(), net.reg)):
                grads[f"layers.{i}.weight"] = grads[f"layers.{i}.weight"] + dweight_reg
        record(trace, "grad_input", dh)
        return {name: grads[name] for name in net.params}

    def train_step(self, x, target, scaler=None, clip=None, order=None, reduce=None):
        """One optimizer step as the stock script runs it; x, target one batch, or lists of the
        step's k micro-batches:

            for each micro-batch:  with autocast: loss = criterion(model(x), y) / k
                                   scaler.scale(loss).backward()   (no scaler: loss.backward())
            scaler.unscale_(opt)                  (only with clip: the true gradients are clipped)
            clip_grad_norm_(params, **clip)       (clip: {"max_norm", "norm_type"}; optional)
            scaler.step(opt); scaler.update()     (no scaler: opt.step())

        Each backward starts from S / k (no scaler: 1 / k; manual.step.micro_batch_seed); the
        float32 leaf gradients are summed over micro-batches as AccumulateGrad does.  A scaler
        skips the optimizer when a gradient was non-finite at unscale time; clipping still
        measures it (an inf or NaN total norm, as clip_grad_norm_ returns).  order: the
        parameter names in the twin's parameters() order (the norm of norms; default the net's).
        reduce: grads -> grads applied after the last backward (data parallel: the float32
        gradients averaged over the ranks, still scaled; unscale, inf check and clipping then run
        on the averaged gradients, as GradScaler does after DDP's all-reduce).
        -> dict: loss (float32, Σ loss_i / k before the update), stepped (bool), total_norm and
        clip_coef (0-d tensors; None without clip), grads (the float32 gradients the optimizer
        was given: reduced, unscaled, clipped)."""
        micro = list(zip(x, target)) if isinstance(x, (list, tuple)) else [(x, target)]
        scale = None if scaler is None else scaler.scale_seed(micro[0][0].device)
        grads = loss = None
        for xb, tb in micro:
            loss_i, cache = self.forward(xb, tb)
            seed = micro_batch_seed(len(micro), loss_i, scale)
            grads = accumulate_grads(grads, self.backward(cache, seed))
            loss_i = loss_i / len(micro)
            loss = loss_i if loss is None else loss + loss_i
        if reduce is not None:
            grads = reduce(grads)
        out = {"loss": loss, "stepped": True, "total_norm": None, "clip_coef": None}
        if clip is not None:
            if scaler is not None:
                scaler.unscale_(grads)
            names = list(order) if order is not None else list(self.net.params)
            grads, out["total_norm"], out["clip_coef"] = clip_grad_norm(
                {n: grads[n] for n in names}, clip["max_norm"], clip.get("norm_type", 2.0))
        out["grads"] = grads                     # a scaler's step unscales it in place
        if scaler is None:
            self.net.step(grads)
            return out
        out["stepped"] = scaler.step(self.net.optimizer, self.net.params, grads)
        scaler.update()
        return out
