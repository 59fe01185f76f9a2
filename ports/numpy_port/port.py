"""A port of refnet's manual MLP to NumPy: the worked example of the porting workflow.

    python ports/numpy_port/port.py [--isolate] FIXTURE_DIR OUT_DIR
    refnet check-port OUT_DIR --fixtures FIXTURE_DIR

--isolate feeds every op the fixture's value of its input instead of the port's own (the
backward of layer i starts from the fixture's grad_pre_activation, and so on), so each op is
checked on its own and an error does not smear into everything after it.

It imports numpy and the standard library only (a test enforces it) and is written the way a C
port would be: a safetensors reader and writer by hand, one forward and one backward function per
op, and the computation in the explicit canonical order of the fixtures (docs/porting.md).
For every case of FIXTURE_DIR/manifest.json it reads the inputs and initial parameters,
runs forward, backward and the short training run, and writes every intermediate under the
fixture's names to OUT_DIR/<case>.safetensors, then OUT_DIR/manifest.json.

Shapes: N batch, D inputs, H units of a layer, C outputs.  Parameters in nn.Linear layout:
weight (H, D), bias (H,).
"""
import hashlib
import json
import math
import os
import struct
import sys
import tempfile

import numpy as np

SCHEMA_VERSION = 1
# BF16 has no NumPy dtype: its 16 bits are read as uint16 and held as float32 (the bfloat16 value
# exactly: bfloat16 is the top half of a float32), see bf16_from_bits / bf16_to_bits
DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "F16": np.dtype("<f2"),
          "BF16": np.dtype("<u2"), "I64": np.dtype("<i8"), "BOOL": np.dtype("?")}
NAMES = {v: k for k, v in DTYPES.items() if k != "BF16"}


# --- file format ----------------------------------------------------------------------------
def bf16_from_bits(bits):
    """uint16 bfloat16 bits -> float32 arrays holding the same values (the bits as the top half)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def bf16_to_bits(a, name):
    """float32 holding bfloat16 values -> their uint16 bits; a value that is not a bfloat16
    (low 16 bits set: the port forgot to round) is refused."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    if np.any(u & np.uint32(0xFFFF)):
        raise ValueError(f"tensor {name!r}: expected bfloat16 values (float32 with the low 16 bits "
                         f"zero), got unrounded float32")
    return (u >> np.uint32(16)).astype(np.uint16)


def read_safetensors(path):
    """-> {name: array}.  u64 LE header length n, n bytes of JSON, then raw LE C-order data.
    BF16 tensors come back as float32 arrays of bfloat16 values (bf16_from_bits)."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: truncated (no header)")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise ValueError(f"{path}: truncated (header of {n} bytes, file of {len(blob)})")
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    header.pop("__metadata__", None)
    data = blob[8 + n:]
    out = {}
    for name, info in header.items():
        dt = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != dt.itemsize * int(np.prod(shape, dtype=np.int64)) or end > len(data):
            raise ValueError(f"{path}: tensor {name!r} does not fit its data_offsets (truncated?)")
        a = np.frombuffer(data[begin:end], dtype=dt).reshape(shape).astype(dt.newbyteorder("="))
        out[name] = bf16_from_bits(a) if info["dtype"] == "BF16" else a
    return out


def write_safetensors(path, tensors, dtypes=None):
    """Write {name: array} in the given order (atomically: temp file + rename).  dtypes: {name:
    the file dtype the fixture's manifest lists}; an array of another dtype is refused (a port bug),
    and a BF16 one is a float32 array of bfloat16 values (bf16_to_bits).  Without dtypes each
    array is written in its own dtype (no BF16)."""
    header, chunks, offset = {}, [], 0
    for name, a in tensors.items():
        a = np.asarray(a)
        if not a.flags.c_contiguous:
            a = a.copy(order="C")   # (np.ascontiguousarray would turn a scalar's shape [] into [1])
        want = dtypes[name] if dtypes else NAMES[a.dtype.newbyteorder("<")]
        if want == "BF16" and a.dtype == np.float32:
            a = bf16_to_bits(a, name).reshape(a.shape)
        elif NAMES.get(a.dtype.newbyteorder("<")) != want:
            raise ValueError(f"tensor {name!r}: the port computed {a.dtype}, the fixture lists {want}")
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": want, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    _write_atomic(path, struct.pack("<Q", len(head)) + head + b"".join(chunks))


def _write_atomic(path, data):
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# --- linear layer -----------------------------------------------------------------------------
def linear_forward(x, w, b):
    """x (N, D), w (H, D), b (H,) or None -> z (N, H) = x·wᵀ + b."""
    z = x @ w.T
    if b is not None:
        z = z + b
    return z


def linear_backward(dz, x, w, has_bias):
    """dz (N, H) -> dx (N, D) = dz·w, dw (H, D) = dzᵀ·x, db (H,) = Σₙ dz."""
    dx = dz @ w
    dw = dz.T @ x
    db = dz.sum(axis=0) if has_bias else None
    return dx, dw, db


# --- activations (forward returns y and what backward needs) ------------------------------------
def fma(a, b, c):
    """a·b + c with one rounding, as the C kernels' fused multiply-add.

    float32: the product of two floats is exact in float64, so one float64 add then a cast is the
    fused result (up to a double-rounding tie, vanishingly rare).  float64: Dekker's exact product
    (p + e = a·b) and Knuth's two-sum (s + t = p + c), then s + (t + e): correct except in rare
    near-tie cases.
    """
    if a.dtype == np.float32:
        return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)
    p = a * b
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    e = ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
    s = p + c
    bp = s - p
    t = (p - (s - bp)) + (c - bp)
    return s + (t + e)


def _split(a):
    c = a * 134217729.0  # 2**27 + 1 (Veltkamp)
    hi = c - (c - a)
    return hi, a - hi


def sigmoid_forward(z):
    with np.errstate(over="ignore"):                               # e⁻ᶻ = inf  ->  σ = 0
        y = (1.0 / (1.0 + np.exp(-z))).astype(z.dtype, copy=False)   # σ(z) = 1 / (1 + e⁻ᶻ)
    return y, y


def sigmoid_backward(dy, y):
    return dy * (1 - y) * y                       # σ' = σ(1 − σ), left to right as PyTorch


def tanh_forward(z):
    y = np.tanh(z)
    return y, y


def tanh_backward(dy, y):
    return dy * fma(-y, y, np.ones_like(y))       # 1 − y² fused (PyTorch's kernel is one FMA)


def relu_forward(z):
    y = np.maximum(z, 0).astype(z.dtype)
    return y, y


def relu_backward(dy, y):
    return np.where(y <= 0, np.zeros_like(dy), dy)  # a select: +0 where y ≤ 0


def leaky_relu_forward(z, slope):
    return np.where(z > 0, z, z * z.dtype.type(slope)), (z, slope)


def leaky_relu_backward(dy, cache):
    z, slope = cache
    return np.where(z > 0, dy, dy * dy.dtype.type(slope))


def elu_forward(z, alpha):
    a = z.dtype.type(alpha)
    return np.where(z > 0, z, a * np.expm1(z)), (z, alpha)


def elu_backward(dy, cache):
    z, alpha = cache
    a = dy.dtype.type(alpha)
    return np.where(z <= 0, dy * a * np.exp(z), dy)  # elu' = α·eᶻ for z ≤ 0, else 1


def maxout_forward(z, k):
    n, width = z.shape
    pieces = z.reshape(n, width // k, k)
    idx = pieces.argmax(axis=2)                   # first maximal piece, as torch.max(dim)
    return np.take_along_axis(pieces, idx[:, :, None], 2)[:, :, 0], (z.shape, idx, k)


def maxout_backward(dy, cache):
    (n, width), idx, k = cache
    dz = np.zeros((n, width // k, k), dtype=dy.dtype)
    np.put_along_axis(dz, idx[:, :, None], dy[:, :, None], 2)
    return dz.reshape(n, width)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu_forward(z):
    cdf = (0.5 * (1.0 + _erf(z.astype(np.float64) / math.sqrt(2.0)))).astype(z.dtype)
    return z * cdf, z


def gelu_backward(dy, z):
    # gelu' = Φ(z) + z·φ(z), Φ(z) = (1 + erf(z/√2))/2, φ(z) = e^(−z²/2)/√(2π)
    z64 = z.astype(np.float64)
    d = 0.5 * (1.0 + _erf(z64 / math.sqrt(2.0))) + z64 * np.exp(-0.5 * z64 * z64) / math.sqrt(2 * math.pi)
    return dy * d.astype(dy.dtype)


_GELU_TANH_BETA, _GELU_TANH_KAPPA = math.sqrt(2.0 / math.pi), 0.044715


def gelu_tanh_forward(z):
    t = np.tanh(z.dtype.type(_GELU_TANH_BETA) * (z + z.dtype.type(_GELU_TANH_KAPPA) * z * z * z))
    return z.dtype.type(0.5) * z * (1 + t), z


def gelu_tanh_backward(dy, z):
    # u = β(z + κz³), t = tanh u: gelu' = (1 + t)/2 + (z/2)·(1 − t²)·β(1 + 3κz²)
    b, k = z.dtype.type(_GELU_TANH_BETA), z.dtype.type(_GELU_TANH_KAPPA)
    t = np.tanh(b * (z + k * z * z * z))
    half = z.dtype.type(0.5)
    return dy * (half * (1 + t) + half * z * (1 - t * t) * b * (1 + 3 * k * z * z))


def silu_forward(z):
    with np.errstate(over="ignore"):
        s = 1 / (1 + np.exp(-z))
    return z * s, z


def silu_backward(dy, z):
    # σ = 1/(1 + e⁻ᶻ), silu' = σ·(1 + z·(1 − σ))
    with np.errstate(over="ignore"):
        s = 1 / (1 + np.exp(-z))
    return dy * s * (1 + z * (1 - s))


def identity_forward(z):
    return z, None


def identity_backward(dy, cache):
    return dy


ACTIVATIONS = {"sigmoid": (sigmoid_forward, sigmoid_backward, None),
               "tanh": (tanh_forward, tanh_backward, None),
               "relu": (relu_forward, relu_backward, None),
               "leaky_relu": (leaky_relu_forward, leaky_relu_backward, "slope"),
               "elu": (elu_forward, elu_backward, "alpha"),
               "maxout": (maxout_forward, maxout_backward, "k"),
               "identity": (identity_forward, identity_backward, None),
               "gelu": (gelu_forward, gelu_backward, None),
               "gelu_tanh": (gelu_tanh_forward, gelu_tanh_backward, None),
               "silu": (silu_forward, silu_backward, None)}


# --- losses: forward(out, target) -> (loss, cache); backward(cache, dloss) -> dL/dout ------------
# dloss: the seed of the backward in the loss's dtype: 1, 1/k for one of k accumulated
# micro-batches, or a GradScaler's scale S.  Each backward multiplies by it where torch's does.
def sum_squared_forward(out, target):
    diff = out - target
    sq = diff * diff
    return sq.sum(dtype=sq.dtype), diff           # L = Σ (out − target)²


def sum_squared_backward(diff, dloss):
    return (2.0 * diff) * dloss                   # dL/dout = 2·diff·dloss


def mse_forward(out, target):
    diff = out - target
    sq = diff * diff
    return sq.mean(dtype=sq.dtype), diff          # L = mean (out − target)²


def mse_backward(diff, dloss):
    return (diff.dtype.type(2.0 / diff.size) * diff) * dloss  # (2/numel)·diff·dloss, 2/numel in double


def cross_entropy_forward(out, labels):
    """L = −(1/N) Σᵢ log softmax(out)ᵢ[labelsᵢ]; out (N, C), labels (N,) int64."""
    shifted = out - out.max(axis=1, keepdims=True)                 # log_softmax: x − max first
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    picked = logp[np.arange(out.shape[0]), labels]
    # nll_loss's CPU loop: 8 partial sums, sample b subtracted from partial 0, partial j folded
    # into j + 1 while b's low 4·(j+1) bits are zero; then partials added in order, ÷ N.
    zero = out.dtype.type(0)
    partial = [zero] * 8
    for b in range(out.shape[0]):
        partial[0] = partial[0] - picked[b]
        for j in range(7):
            if b & (15 << (4 * j)):
                break
            partial[j + 1], partial[j] = partial[j + 1] + partial[j], zero
    total = zero
    for v in partial:
        total = total + v
    return total / out.dtype.type(out.shape[0]), (logp, labels)


def cross_entropy_backward(cache, dloss):
    logp, labels = cache
    n = logp.shape[0]
    dlogp = np.zeros_like(logp)
    dlogp[np.arange(n), labels] = -(dloss / logp.dtype.type(n))  # nll: −dloss/N at tᵢ
    row_sum = dlogp.sum(axis=1, keepdims=True)
    return fma(-np.exp(logp), np.broadcast_to(row_sum, logp.shape), dlogp)  # G − e^logp·ΣG, fused


def svm_forward(out, labels):
    """L = (1/N) Σᵢ (1/C) Σ_{j≠tᵢ} max(0, 1 − out_{i,tᵢ} + out_{i,j}) (PyTorch's MultiMarginLoss)."""
    n, c = out.shape
    t = out.dtype.type
    z = (t(1) - out[np.arange(n), labels][:, None]) + out          # margins (N, C)
    active = (z > 0) & (np.arange(c)[None, :] != labels[:, None])
    row = np.zeros(n, dtype=out.dtype)
    for j in range(c):                                             # classes in order, in the dtype
        row = row + np.where(active[:, j], z[:, j], t(0))
    row = row / t(c)
    total = 0.0                                                    # rows accumulated in double
    for v in row.astype(np.float64):
        total += float(v)
    return t(total / n), (active, labels, out.dtype)


def svm_backward(cache, dloss):
    active, labels, dt = cache
    n, c = active.shape
    dy = np.where(active, dt.type(1.0 / (n * c)), dt.type(0))       # 1/(N·C) per active j ≠ tᵢ
    dy_target = np.zeros(n, dtype=dt)
    for j in range(c):                                             # −Σ_j, class by class
        dy_target = dy_target - dy[:, j]
    dy[np.arange(n), labels] = dy_target
    return dy * dloss


LOSSES = {"sum_squared": (sum_squared_forward, sum_squared_backward),
          "mse": (mse_forward, mse_backward),
          "cross_entropy": (cross_entropy_forward, cross_entropy_backward),
          "svm": (svm_forward, svm_backward)}


def l2_forward(weights, reg):
    """R = reg·Σ_layers Σ W² (weights only), as manual: s = ΣW₀²; s = s + ΣW₁² …; R = s·reg."""
    total = None
    for w in weights:
        sq = w * w
        s = sq.sum(dtype=sq.dtype)
        total = s if total is None else total + s
    return total * total.dtype.type(reg)


def l2_backward(weights, reg, dloss):
    g = dloss * weights[0].dtype.type(reg)        # dloss·reg in the weights' dtype
    return [g * (2.0 * w) for w in weights]       # ∂R/∂W = (dloss·reg)·(2W)


# --- the optional layers: batch norm, layer norm, dropout, embedding -----------------------------
def batchnorm_forward(z, w, b, buffers, training, momentum, eps):
    """nn.BatchNorm1d, per feature over the batch.  z (N, H), w, b (H,); buffers: running_mean,
    running_var (H,) and num_batches_tracked (an int64 scalar), updated in place in training.

    training: μ = Σₙ z / N,  σ² = Σₙ (z − μ)² / N (biased: this normalizes),  1/σ = 1/√(σ² + eps)
              running_mean ← (1 − m)·running_mean + m·μ
              running_var  ← (1 − m)·running_var + m·σ²·N/(N − 1)   (unbiased), batches += 1
    eval:     μ, σ² = running_mean, running_var
    out = (z − μ)·(1/σ)·w + b.  Returns out, μ (H,), 1/σ (H,), and the cache for backward."""
    t = z.dtype.type
    n = z.shape[0]
    if training:
        mean = z.sum(axis=0) / t(n)
        zc = z - mean
        var = (zc * zc).sum(axis=0) / t(n)
        invstd = t(1) / np.sqrt(var + t(eps))
        m = t(momentum)
        buffers["running_mean"] = (t(1) - m) * buffers["running_mean"] + m * mean
        buffers["running_var"] = (t(1) - m) * buffers["running_var"] + m * (var * t(n / (n - 1)))
        buffers["num_batches_tracked"] = buffers["num_batches_tracked"] + np.int64(1)
    else:
        mean = buffers["running_mean"]
        invstd = t(1) / np.sqrt(buffers["running_var"] + t(eps))
    out = (z - mean) * invstd * w + b
    return out, mean, invstd, (z, w, mean, invstd, training)


def batchnorm_backward(dout, cache):
    """dout (N, H) -> dz (N, H), dw (H,), db (H,).
    dz = (w/σ)·(dout − Σdout/N − (z − μ)·Σ(z − μ)·dout/(N·σ²)) in training, (w/σ)·dout in eval;
    dw = Σₙ (z − μ)·dout/σ;  db = Σₙ dout."""
    z, w, mean, invstd, training = cache
    t = z.dtype.type
    n = z.shape[0]
    zc = z - mean
    sum_dy = dout.sum(axis=0)
    dotp = (zc * dout).sum(axis=0)
    dw, db = dotp * invstd, sum_dy
    if not training:
        return dout * invstd * w, dw, db
    k = dotp * invstd * invstd / t(n)
    dz = (dout - sum_dy / t(n) - zc * k) * invstd * w
    return dz, dw, db


def layernorm_forward(z, w, b, eps):
    """nn.LayerNorm(H), per row over the features: μᵢ = Σⱼ z / H, σᵢ² = Σⱼ (z − μᵢ)² / H (biased),
    out = (z − μᵢ)·(1/σᵢ)·w + b with 1/σᵢ = 1/√(σᵢ² + eps).  Returns out, μ (N,), 1/σ (N,), cache."""
    t = z.dtype.type
    h = z.shape[1]
    mean = z.sum(axis=1) / t(h)
    zc = z - mean[:, None]
    var = (zc * zc).sum(axis=1) / t(h)
    rstd = t(1) / np.sqrt(var + t(eps))
    out = zc * rstd[:, None] * w + b
    return out, mean, rstd, (z, w, mean, rstd)


def layernorm_backward(dout, cache):
    """dout (N, H) -> dz, dw, db.  Per row, a = 1/σᵢ, ds = Σⱼ dout·z·w, dbr = Σⱼ dout·w:
    b = (dbr·μ − ds)·a³/H,  c = −b·μ − dbr·a/H,  dz = a·dout·w + b·z + c  (layer_norm_kernel.cpp);
    dw = Σᵢ dout·(z − μᵢ)·a,  db = Σᵢ dout."""
    z, w, mean, rstd = cache
    t = z.dtype.type
    scale = t(1) / t(z.shape[1])
    a, mu = rstd[:, None], mean[:, None]
    ds = (dout * z * w).sum(axis=1, keepdims=True)
    dbr = (dout * w).sum(axis=1, keepdims=True)
    bb = (dbr * mu - ds) * a * a * a * scale
    c = -bb * mu - dbr * a * scale
    dz = a * dout * w + bb * z + c
    dw = (dout * (a * z - a * mu)).sum(axis=0)
    db = dout.sum(axis=0)
    return dz, dw, db


def dropout_forward(y, mask, p):
    """Inverted dropout with the fixture's 0/1 mask: noise = mask/(1 − p), the division in the
    dtype (torch: bernoulli_(1 − p) then div_(1 − p)); out = y·noise.  -> out, noise."""
    noise = mask / y.dtype.type(1 - p)
    return y * noise, noise


def dropout_backward(dout, noise):
    return dout * noise                               # out = y·noise  ⇒  dy = dout·noise


def embedding_forward(idx, table):
    """idx (N, T) int64, table (V, E) -> rows table[idx] flattened to (N, T·E)."""
    n, ctx = idx.shape
    return table[idx.reshape(-1)].reshape(n, ctx * table.shape[1])


def embedding_backward(dout, idx, vocab):
    """dout (N, T·E) -> dtable (V, E): dtable[v] = Σ dout rows whose index is v, added one at a
    time in the row-major order of idx (embedding_dense_backward_cpu), from zeros."""
    flat = idx.reshape(-1)
    rows = dout.reshape(flat.size, -1)
    dtable = np.zeros((vocab, rows.shape[1]), dtype=dout.dtype)
    for i in range(flat.size):
        dtable[flat[i]] = dtable[flat[i]] + rows[i]
    return dtable


NORMS = {"batchnorm": (batchnorm_forward, batchnorm_backward),
         "layernorm": (layernorm_forward, layernorm_backward)}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


# --- residual FFN blocks (manual/blocks.py) ------------------------------------------------------
def block_forward(h, params, prefix, settings, options, trace, feed=None):
    """h (N, D) -> h + fc2(act(fc1(LN(h)))) (N, D), cache; LN only with norm "layer".  Each value
    recorded under forward.{prefix}.* (record: --isolate goes on with the fixture's)."""
    u, norm_cache = h, None
    if settings["norm"] == "layer":
        u, _, _, norm_cache = layernorm_forward(h, params[f"{prefix}.norm.weight"],
                                                params[f"{prefix}.norm.bias"], options["eps"])
        u = record(trace, feed, f"forward.{prefix}.norm", u)
    z = record(trace, feed, f"forward.{prefix}.pre_activation",
               linear_forward(u, params[f"{prefix}.fc1.weight"], params[f"{prefix}.fc1.bias"]))
    fwd, _, opt = ACTIVATIONS[settings["activation"]]
    a, act_cache = fwd(z, options[opt]) if opt else fwd(z)
    fed = record(trace, feed, f"forward.{prefix}.activation", a)
    act_cache, a = (fed if act_cache is a else act_cache), fed
    v = record(trace, feed, f"forward.{prefix}.branch",
               linear_forward(a, params[f"{prefix}.fc2.weight"], params[f"{prefix}.fc2.bias"]))
    out = record(trace, feed, f"forward.{prefix}.output", h + v)     # the residual add
    return out, (prefix, u, a, norm_cache, act_cache)


def block_backward(dout, cache, params, settings, trace, feed=None):
    """dout (N, D) -> dh = dout + the branch's gradient at h (the residual: dout reaches both the
    add's input h and the branch; the two are summed once), the block's parameter gradients."""
    prefix, u, a, norm_cache, act_cache = cache
    grads = {}
    dout = record(trace, feed, f"backward.{prefix}.grad_output", dout)
    da, grads[f"{prefix}.fc2.weight"], grads[f"{prefix}.fc2.bias"] = linear_backward(
        dout, a, params[f"{prefix}.fc2.weight"], True)
    da = record(trace, feed, f"backward.{prefix}.grad_activation", da)
    dz = record(trace, feed, f"backward.{prefix}.grad_pre_activation",
                ACTIVATIONS[settings["activation"]][1](da, act_cache))
    du, grads[f"{prefix}.fc1.weight"], grads[f"{prefix}.fc1.bias"] = linear_backward(
        dz, u, params[f"{prefix}.fc1.weight"], True)
    if norm_cache is not None:
        du = record(trace, feed, f"backward.{prefix}.grad_norm", du)
        du, grads[f"{prefix}.norm.weight"], grads[f"{prefix}.norm.bias"] = \
            layernorm_backward(du, norm_cache)
    du = record(trace, feed, f"backward.{prefix}.grad_branch", du)
    return dout + du, grads


# --- the MLP ----------------------------------------------------------------------------------
class MLP:
    def __init__(self, spec, params, buffers=None):
        self.params = params
        self.n_layers = len(spec["sizes"]) - 1
        act = spec["activation"]
        self.acts = [act] * (self.n_layers - 1) if isinstance(act, str) else list(act)
        self.loss = spec["loss"]
        self.reg = spec.get("reg", 0.0)
        self.options = {"slope": spec["slope"], "alpha": spec["alpha"], "k": spec["k"]}
        self.bias = spec["bias"]
        self.norm = spec.get("norm")
        self.dropout = spec.get("dropout", 0.0)
        self.momentum, self.eps = spec.get("momentum", 0.1), spec.get("eps", 1e-5)
        self.embedding = spec.get("embedding")
        self.blocks = spec.get("blocks")             # {"n", "width", "hidden", "norm", "activation"}
        self.buffers = buffers if buffers is not None else {}   # "norms.{i}.running_mean" …

    def weights(self):
        return [self.params[f"layers.{i}.weight"] for i in range(self.n_layers)]

    def forward(self, x, target, trace, feed=None, masks=None):
        """Forward, recording every intermediate in `trace`.  With `feed` (the fixtures), each op
        takes its input from the fixture instead of from the op before it (--isolate).
        masks: {i: the 0/1 dropout mask (N, H) of hidden layer i} when the spec has dropout."""
        caches, h, block_caches = [], x, []
        if self.embedding is not None:               # integer x (N, T) -> (N, T·E)
            h = record(trace, feed, "forward.embed.output",
                       embedding_forward(x, self.params["embed.weight"]))
        for i in range(self.n_layers):
            if i == self.n_layers - 1 and self.blocks:   # the residual blocks, then the head
                for blk in range(self.blocks["n"]):
                    h, cache = block_forward(h, self.params, f"blocks.{blk}", self.blocks,
                                             {**self.options, "eps": self.eps}, trace, feed)
                    block_caches.append(cache)
                h = record(trace, feed, "forward.blocks.output", h)
            w, b = self.params[f"layers.{i}.weight"], self.params.get(f"layers.{i}.bias")
            z = linear_forward(h, w, b)
            act_cache = norm_cache = noise = None
            if i < self.n_layers - 1 and self.norm is not None:
                z = record(trace, feed, f"forward.layers.{i}.linear", z)
                nw, nb = self.params[f"norms.{i}.weight"], self.params[f"norms.{i}.bias"]
                if self.norm == "batchnorm":
                    bufs = {k: self.buffers[f"norms.{i}.{k}"] for k in BUFFERS}
                    z, mean, invstd, norm_cache = batchnorm_forward(z, nw, nb, bufs, True,
                                                                    self.momentum, self.eps)
                    for k in BUFFERS:
                        self.buffers[f"norms.{i}.{k}"] = bufs[k]
                else:
                    z, mean, invstd, norm_cache = layernorm_forward(z, nw, nb, self.eps)
                trace[f"forward.norms.{i}.mean"] = mean
                trace[f"forward.norms.{i}.invstd"] = invstd
                if self.norm == "batchnorm":
                    for k in BUFFERS:
                        trace[f"forward.norms.{i}.{k}"] = self.buffers[f"norms.{i}.{k}"]
            z = record(trace, feed, f"forward.layers.{i}.pre_activation", z)
            if i < self.n_layers - 1:
                fwd, _, opt = ACTIVATIONS[self.acts[i]]
                y, act_cache = fwd(z, self.options[opt]) if opt else fwd(z)
                fed = record(trace, feed, f"forward.layers.{i}.activation", y)
                act_cache, y = (fed if act_cache is y else act_cache), fed
                if self.dropout:
                    y, noise = dropout_forward(y, masks[i], self.dropout)
                    y = record(trace, feed, f"forward.layers.{i}.dropout", y)
            else:
                y = z
            caches.append((h, norm_cache, act_cache, noise))
            h = y
        h = record(trace, feed, "forward.output", h)
        loss, loss_cache = LOSSES[self.loss][0](h, target)
        if self.reg:                                  # L = data loss + reg·Σ W²
            loss = loss + l2_forward(self.weights(), self.reg)
        trace["forward.loss"] = np.asarray(loss, dtype=h.dtype)
        return loss, (caches, loss_cache, x, block_caches)

    def backward(self, cache, trace, feed=None, dloss=None):
        """dloss: the backward's seed (default 1 in the dtype; 1/k for one of k micro-batches)."""
        caches, loss_cache, x, block_caches = cache
        dtype = self.params["layers.0.weight"].dtype
        dloss = dtype.type(1) if dloss is None else dloss
        dh = record(trace, feed, "backward.grad_output", LOSSES[self.loss][1](loss_cache, dloss))
        grads = {}
        for i in reversed(range(self.n_layers)):
            x_in, norm_cache, act_cache, noise = caches[i]
            if i < self.n_layers - 1:
                if self.dropout:
                    dh = record(trace, feed, f"backward.layers.{i}.grad_dropout", dh)
                    dh = dropout_backward(dh, noise)
                dh = record(trace, feed, f"backward.layers.{i}.grad_activation", dh)
                dh = ACTIVATIONS[self.acts[i]][1](dh, act_cache)
            dh = record(trace, feed, f"backward.layers.{i}.grad_pre_activation", dh)
            if norm_cache is not None:
                dh, dnw, dnb = NORMS[self.norm][1](dh, norm_cache)
                grads[f"norms.{i}.weight"] = trace[f"grads.norms.{i}.weight"] = dnw
                grads[f"norms.{i}.bias"] = trace[f"grads.norms.{i}.bias"] = dnb
                dh = record(trace, feed, f"backward.layers.{i}.grad_linear", dh)
            dh, dw, db = linear_backward(dh, x_in, self.params[f"layers.{i}.weight"], self.bias)
            grads[f"layers.{i}.weight"] = dw
            trace[f"grads.layers.{i}.weight"] = dw
            if self.bias:
                grads[f"layers.{i}.bias"] = db
                trace[f"grads.layers.{i}.bias"] = db
            for cache in reversed(block_caches if i == self.n_layers - 1 else []):
                dh, block_grads = block_backward(dh, cache, self.params, self.blocks, trace, feed)
                grads.update(block_grads)
                trace.update({f"grads.{n}": g for n, g in block_grads.items()})
            if block_caches and i == self.n_layers - 1:
                dh = record(trace, feed, "backward.blocks.grad_input", dh)
        if self.reg:  # the second use of each W: its gradient is added to the data gradient (one add)
            for i, dw_reg in enumerate(l2_backward(self.weights(), self.reg, dloss)):
                dw = grads[f"layers.{i}.weight"] = grads[f"layers.{i}.weight"] + dw_reg
                trace[f"grads.layers.{i}.weight"] = dw
        dh = record(trace, feed, "backward.grad_input", dh)
        if self.embedding is not None:   # dh is the gradient of the flattened lookup (N, T·E)
            dt = embedding_backward(dh, x, self.params["embed.weight"].shape[0])
            grads["embed.weight"] = trace["grads.embed.weight"] = dt
        return grads


def record(trace, feed, name, value):
    """Keep our value for the output file; go on with the fixture's value when isolating."""
    trace[name] = value
    return value if feed is None else feed[name]


# --- what this port supports: checked for every case before anything is computed ----------------
SPEC_KEYS_READ = {"sizes", "activation", "bias", "loss", "reg", "optimizer", "steps", "batch_size",
                  "dtype", "slope", "alpha", "k", "norm", "dropout", "momentum", "eps", "embedding",
                  "autocast", "grad_scaler", "clip_grad_norm", "accumulate", "lr_schedule",
                  "blocks"}
SPEC_KEYS_IGNORED = {"name", "data", "n_samples", "seed", "init", "device"}  # inputs come from the file
BLOCK_KEYS = {"n", "width", "hidden", "norm", "activation"}
SCHEDULES = {"warmup_cosine": {"name", "warmup_steps", "min_lr", "start_factor"},
             "cosine": {"name", "min_lr"}, "step": {"name", "step_size", "gamma"}}
AUTOCAST_ACTIVATIONS = ("relu", "tanh", "sigmoid", "leaky_relu", "elu", "maxout", "identity")
SGD_SETTINGS = {"lr", "momentum", "dampening", "nesterov", "weight_decay"}
ADAM_SETTINGS = {"lr", "betas", "eps", "weight_decay", "amsgrad"}
OPTIMIZER_SETTINGS = {"sgd": SGD_SETTINGS, "adam": ADAM_SETTINGS, "adamw": ADAM_SETTINGS}
EMBEDDING_KEYS = {"vocab", "dim", "context"}


def _number(v):
    return not isinstance(v, bool) and isinstance(v, (int, float))


def check_supported(spec):
    """Raise ValueError (one line ending 'not supported by the NumPy port') for anything the port
    does not implement, so that it refuses a case before computing or writing anything."""
    unknown = sorted(set(spec) - SPEC_KEYS_READ - SPEC_KEYS_IGNORED)
    if unknown:
        raise ValueError(f"spec key(s) {unknown} are not supported by the NumPy port")
    check_step_keys(spec)
    check_autocast(spec)
    norm = spec.get("norm")
    if norm is not None and norm not in NORMS:
        raise ValueError(f"norm {norm!r} is not supported by the NumPy port ({', '.join(NORMS)})")
    p = spec.get("dropout", 0.0)
    if not _number(p) or not 0 <= p < 1:
        raise ValueError(f"dropout {p!r} is not supported by the NumPy port (a p in [0, 1))")
    for key, ok in (("momentum", lambda v: 0 <= v <= 1), ("eps", lambda v: 0 < v <= 1)):
        v = spec.get(key, 0.1 if key == "momentum" else 1e-5)
        if not _number(v) or not ok(v):
            raise ValueError(f"{key} {v!r} is not supported by the NumPy port")
    emb = spec.get("embedding")
    if emb is not None and (not isinstance(emb, dict) or set(emb) != EMBEDDING_KEYS or not all(
            isinstance(emb[k], int) and not isinstance(emb[k], bool) and emb[k] >= 1 for k in emb)):
        raise ValueError(f"embedding {emb!r} is not supported by the NumPy port "
                         f"(an object of integers vocab, dim, context)")
    if spec.get("dtype") not in ("float32", "float64"):
        raise ValueError(f"dtype {spec.get('dtype')!r} is not supported by the NumPy port "
                         f"(float32, float64)")
    if spec.get("loss") not in LOSSES:
        raise ValueError(f"loss {spec.get('loss')!r} is not supported by the NumPy port "
                         f"({', '.join(LOSSES)})")
    act = spec.get("activation")
    for a in [act] if isinstance(act, str) else list(act or []):
        if a not in ACTIVATIONS:
            raise ValueError(f"activation {a!r} is not supported by the NumPy port "
                             f"({', '.join(ACTIVATIONS)})")
    opt = spec.get("optimizer") or {}
    if opt.get("name") not in OPTIMIZER_SETTINGS:
        raise ValueError(f"optimizer {opt.get('name')!r} is not supported by the NumPy port "
                         f"({', '.join(OPTIMIZER_SETTINGS)})")
    rest = sorted(set(opt) - OPTIMIZER_SETTINGS[opt["name"]] - {"name"})
    if rest:
        raise ValueError(f"optimizer settings {rest} are not supported by the NumPy port")
    reg = spec.get("reg", 0.0)
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not 0 <= reg < float("inf"):
        raise ValueError(f"reg {reg!r} is not supported by the NumPy port (a finite number >= 0)")


def check_step_keys(spec):
    """clip_grad_norm, accumulate, lr_schedule, blocks: the shapes refnet's spec normalizes them
    to."""
    clip = spec.get("clip_grad_norm")
    if clip is not None and (not isinstance(clip, dict) or not _number(clip.get("max_norm"))
                             or clip.get("norm_type", 2) not in (2, "inf")):
        raise ValueError(f"clip_grad_norm {clip!r} is not supported by the NumPy port "
                         f"(max_norm, norm_type 2 or 'inf')")
    k = spec.get("accumulate", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"accumulate {k!r} is not supported by the NumPy port (an integer >= 1)")
    blocks = spec.get("blocks")
    if blocks is not None and (not isinstance(blocks, dict) or set(blocks) != BLOCK_KEYS
                               or blocks["norm"] not in ("layer", None)
                               or blocks["activation"] not in set(ACTIVATIONS) - {"maxout"}):
        raise ValueError(f"blocks {blocks!r} is not supported by the NumPy port (n, width, "
                         f"hidden, norm 'layer' or null, an elementwise activation)")
    sched = spec.get("lr_schedule")
    if sched is not None and (not isinstance(sched, dict) or sched.get("name") not in SCHEDULES
                              or not set(sched) <= SCHEDULES[sched["name"]]):
        raise ValueError(f"lr_schedule {sched!r} is not supported by the NumPy port "
                         f"({', '.join(SCHEDULES)})")


def check_autocast(spec):
    """autocast bfloat16 / float16 over float32 parameters, the activations it mirrors (with
    clipping and accumulation), no norm, dropout, embedding or blocks (refnet's export refuses
    those with autocast too)."""
    amp = spec.get("autocast")
    if amp is None:
        if spec.get("grad_scaler") not in (None, False):
            raise ValueError("grad_scaler without autocast is not supported by the NumPy port")
        return
    if amp not in ("bfloat16", "float16") or spec.get("dtype") != "float32":
        raise ValueError(f"autocast {amp!r} with dtype {spec.get('dtype')!r} is not supported by "
                         f"the NumPy port (bfloat16 or float16 over float32)")
    for key, off in (("norm", None), ("dropout", 0.0), ("embedding", None), ("blocks", None)):
        if spec.get(key, off) != off:
            raise ValueError(f"autocast with {key} {spec[key]!r} is not supported by the NumPy port")
    act = spec.get("activation")
    for a in [act] if isinstance(act, str) else list(act or []):
        if a not in AUTOCAST_ACTIVATIONS:
            raise ValueError(f"autocast with activation {a!r} is not supported by the NumPy port "
                             f"({', '.join(AUTOCAST_ACTIVATIONS)})")
    scaler = spec.get("grad_scaler")
    if scaler not in (None, False, True) and (not isinstance(scaler, dict)
                                              or not set(scaler) <= set(SCALER_DEFAULTS)):
        raise ValueError(f"grad_scaler {scaler!r} is not supported by the NumPy port "
                         f"(true or an object of {', '.join(SCALER_DEFAULTS)})")


class SGD:
    """torch.optim.SGD: g += wd·p; b = g | μ·b + (1 − τ)·g; g = g + μ·b (Nesterov) | b; p −= lr·g."""

    def __init__(self, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, **rest):
        if rest:
            raise ValueError(f"optimizer settings {sorted(rest)} are not supported by the NumPy port")
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.nesterov, self.weight_decay, self.buffers = nesterov, weight_decay, {}

    def step(self, params, grads):
        for name, p in params.items():
            g = grads[name]
            t = p.dtype.type
            if self.weight_decay:
                g = fma(p, np.full_like(p, t(self.weight_decay)), g)
            if self.momentum:
                buf = self.buffers.get(name)
                if buf is None:
                    buf = self.buffers[name] = g.copy()
                else:
                    buf = self.buffers[name] = fma(g, np.full_like(g, t(1 - self.dampening)),
                                                   buf * t(self.momentum))
                g = fma(buf, np.full_like(buf, t(self.momentum)), g) if self.nesterov else buf
            params[name] = fma(g, np.full_like(g, t(-self.lr)), p)   # p.add_(g, alpha=−lr): fused


# --- the training step's keys: schedules, clipping, accumulation (docs/porting.md) ---------------
def learning_rates(config, lr, steps):
    """The rate of each of `steps` optimizer steps, as torch.optim.lr_scheduler computes them: each
    step derives the new rate from the previous one (recursively, in Python floats), not from a
    closed form, so the last bits follow these exact expressions.  config: the spec's
    lr_schedule (None: a constant rate)."""
    if config is None:
        return [lr] * steps
    name, eta, base = config["name"], config.get("min_lr", 0.0), lr
    rates = [lr]
    if name == "step":                                   # StepLR: lr·gamma at multiples of step_size
        for epoch in range(1, steps):
            if epoch % config["step_size"] == 0:
                lr = lr * config.get("gamma", 0.1)
            rates.append(lr)
        return rates
    if name == "cosine":                                 # CosineAnnealingLR(T_max = steps)
        return _cosine(lr, base, eta, steps, steps, rates)
    warm = config["warmup_steps"]                        # LinearLR(s → 1 over warm), then cosine
    s = config.get("start_factor", 1.0 / warm)
    rates[0] = lr = lr * s
    for epoch in range(1, warm):
        lr = lr * (1.0 + (1.0 - s) / (warm * s + (epoch - 1) * (1.0 - s)))
        rates.append(lr)
    t_max = steps - warm
    # at the milestone SequentialLR restarts the cosine from its closed form at epoch 0
    lr = eta + (base - eta) * (1 + math.cos(math.pi * 0 / t_max)) / 2
    rates.append(lr)
    return _cosine(lr, base, eta, t_max, t_max, rates)


def _cosine(lr, base, eta, t_max, epochs, rates):
    """CosineAnnealingLR's recursive steps for epochs 1 … epochs − 1, appended to rates:
    ηₜ = η_min + (ηₜ₋₁ − η_min)·(1 + cos(πt/T)) / (1 + cos(π(t − 1)/T))."""
    for t in range(1, epochs):
        if (t - 1 - t_max) % (2 * t_max) == 0:
            lr = lr + (base - eta) * (1 - math.cos(math.pi / t_max)) / 2
        else:
            lr = (1 + math.cos(math.pi * t / t_max)) / (1 + math.cos(math.pi * (t - 1) / t_max)) \
                * (lr - eta) + eta
        rates.append(lr)
    return rates


def tensor_norm(g, norm_type):
    """‖g‖ over all elements in g's dtype: max |g| (inf), or √Σg² (2; the sum in float64, so a
    float32 norm is the correctly rounded one, not torch's lane order: tolerance tier)."""
    if norm_type == "inf":
        return np.abs(g).max() if g.size else g.dtype.type(0)
    return g.dtype.type(math.sqrt(float(np.sum(g.astype(np.float64) ** 2))))


def clip_grad_norm(grads, max_norm, norm_type):
    """torch.nn.utils.clip_grad_norm_: N = ‖(‖g₁‖, …, ‖g_P‖)‖ (a norm of norms, in parameter
    order), c = min((1/(N + 1e-6))·max_norm, 1) (torch's float / Tensor is a reciprocal, then a
    product), every g ← g·c.  -> (clipped grads, N, c)."""
    t = next(iter(grads.values())).dtype.type
    norms = np.array([tensor_norm(g, norm_type) for g in grads.values()], dtype=t)
    total = tensor_norm(norms, norm_type)
    coef = min((t(1) / (total + t(1e-6))) * t(max_norm), t(1))
    return {n: g * coef for n, g in grads.items()}, total, coef


# --- mixed precision: autocast and the GradScaler (manual/autocast.py, manual/grad_scaler.py) -----
def round_bf16(a):
    """float32 -> the nearest bfloat16, ties to even, held as float32 (its low 16 bits zero).

    bfloat16 is the top half of a float32, so the rounding is integer arithmetic on the bits:
    add 0x7FFF plus the lowest kept bit (that makes a tie round to even), then clear the low 16
    bits.  A carry runs into the exponent as it should (the largest values round up to inf); a
    NaN is kept a quiet NaN (its quiet bit set before the low bits are cleared)."""
    u = np.asarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    nan = (u | np.uint32(0x00400000)) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(np.asarray(a, dtype=np.float32)), nan, rounded).view(np.float32)


class LowPrecision:
    """The autocast dtype L: "bfloat16" (float32 arrays of bfloat16 values, rounded by round_bf16
    after every operation) or "float16" (NumPy's float16: each operation computed in float32 and
    rounded to float16).  Values go up to float32 exactly (up).  Overflow to inf (a GradScaler's
    large scale in float16) is expected: the scaler finds it, so NumPy's warnings are off."""

    def __init__(self, name):
        self.name = name

    def cast(self, a):
        """float32 -> L, round to nearest even (torch's .to(L))."""
        a = np.asarray(a, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            return round_bf16(a) if self.name == "bfloat16" else a.astype(np.float16)

    @staticmethod
    def up(a):
        return np.asarray(a).astype(np.float32)

    def addmm(self, h, w, b):
        """The low-precision GEMM h·wᵀ + b: products accumulated in float32 (as the CPU kernels
        do, oneDNN for bf16, ATen's fallback for fp16), the bias added, rounded once to L.  The
        accumulation order is BLAS's, not the kernel's: an element may differ by an ulp of L."""
        with np.errstate(over="ignore", invalid="ignore"):
            z = self.up(h) @ self.up(w).T
            return self.cast(z if b is None else z + self.up(b))

    def mm(self, a, b):
        with np.errstate(over="ignore", invalid="ignore"):
            return self.cast(self.up(a) @ self.up(b))

    def sum0(self, a):
        with np.errstate(over="ignore", invalid="ignore"):       # summed in float32, rounded once
            return self.cast(self.up(a).sum(axis=0))


def autocast_activation_forward(low, name, z, option):
    """The activation on an L tensor: computed in float32, rounded once to L.  -> y, cache in
    float32 (the rounded y where the backward uses y)."""
    fwd = ACTIVATIONS[name][0]
    y32, cache = fwd(low.up(z), option) if option is not None else fwd(low.up(z))
    y = low.cast(y32)
    return y, (low.up(y) if cache is y32 else cache)


def autocast_activation_backward(low, name, dy, cache):
    """dy in L -> dz in L, as torch's kernel on L tensors: float32 inside, one rounding at the end
    (tanh, elu, bf16 sigmoid; relu, leaky_relu, maxout, identity are a select or one product,
    the same either way), except float16's sigmoid: the generic kernel, rounded to float16 after
    every operation (dy·(1 − y)·y in float16)."""
    if name == "sigmoid" and low.name == "float16":
        y = cache.astype(np.float16)
        with np.errstate(invalid="ignore", over="ignore"):   # inf·0 under a scaler's overflow
            return dy * (np.float16(1) - y) * y
    return low.cast(ACTIVATIONS[name][1](low.up(dy), cache))


class AutocastMLP:
    """An MLP step under torch.autocast("cpu", L): float32 parameters cast to L for every GEMM,
    activations in L, the loss in float32 on the output cast up, gradients in L cast up to
    float32 at the parameters (and at x).  Records every value under the fixture's names."""

    def __init__(self, spec, params):
        self.mlp = MLP(spec, params)           # the parameters, activations, loss, reg
        self.low = LowPrecision(spec["autocast"])

    @property
    def params(self):
        return self.mlp.params

    def forward(self, x, target, trace):
        m, low, caches = self.mlp, self.low, []
        h = trace["forward.casts.layers.0.input"] = low.cast(x)
        for i in range(m.n_layers):
            wl = trace[f"forward.casts.layers.{i}.weight"] = low.cast(m.params[f"layers.{i}.weight"])
            bl = None
            if m.bias:
                bl = trace[f"forward.casts.layers.{i}.bias"] = low.cast(m.params[f"layers.{i}.bias"])
            z = trace[f"forward.layers.{i}.pre_activation"] = low.addmm(h, wl, bl)
            cache = None
            if i < m.n_layers - 1:
                act = m.acts[i]
                opt = ACTIVATIONS[act][2]
                z, cache = autocast_activation_forward(low, act, z, m.options[opt] if opt else None)
                trace[f"forward.layers.{i}.activation"] = z
            caches.append((h, wl, cache))
            h = z
        trace["forward.output"] = h
        loss, loss_cache = LOSSES[m.loss][0](low.up(h), target)       # the loss in float32
        if m.reg:
            loss = loss + l2_forward(m.weights(), m.reg)              # on the float32 weights
        trace["forward.loss"] = np.asarray(loss, dtype=np.float32)
        return loss, (caches, loss_cache)

    def backward(self, cache, trace, dloss):
        m, low = self.mlp, self.low
        caches, loss_cache = cache
        dout = trace["backward.grad_output"] = LOSSES[m.loss][1](loss_cache, dloss)   # float32
        dh = trace["backward.grad_output_low"] = low.cast(dout)
        grads = {}
        for i in reversed(range(m.n_layers)):
            h, wl, act_cache = caches[i]
            if i < m.n_layers - 1:
                trace[f"backward.layers.{i}.grad_activation"] = dh
                dh = autocast_activation_backward(low, m.acts[i], dh, act_cache)
            trace[f"backward.layers.{i}.grad_pre_activation"] = dh
            dw = trace[f"backward.casts.layers.{i}.grad_weight"] = low.mm(dh.T, h)
            grads[f"layers.{i}.weight"] = low.up(dw)                  # cast up at the leaf
            if m.bias:
                db = trace[f"backward.casts.layers.{i}.grad_bias"] = low.sum0(dh)
                grads[f"layers.{i}.bias"] = low.up(db)
            dh = low.mm(dh, wl)
        trace["backward.casts.layers.0.grad_input"] = dh
        trace["backward.grad_input"] = low.up(dh)
        if m.reg:   # the float32 weights' second use: added to the cast-up data gradient
            for i, dw_reg in enumerate(l2_backward(m.weights(), m.reg, dloss)):
                grads[f"layers.{i}.weight"] = grads[f"layers.{i}.weight"] + dw_reg
        for name, g in grads.items():
            trace[f"grads.{name}"] = g
        return {name: grads[name] for name in m.params}


SCALER_DEFAULTS = {"init_scale": 2.0 ** 16, "growth_factor": 2.0, "backoff_factor": 0.5,
                   "growth_interval": 2000}


class GradScaler:
    """torch.amp.GradScaler: the backward starts from dloss = S (float32); unscale multiplies each
    gradient by float32(1 / float64(S)) (not a division) and notes any non-finite element; a
    step with one is skipped; then S ← float32(float64(S)·backoff) after an overflow, or
    ·growth (kept only if finite) after growth_interval clean steps."""

    def __init__(self, settings):
        s = {**SCALER_DEFAULTS, **(settings if isinstance(settings, dict) else {})}
        self.scale, self.tracker = np.float32(s["init_scale"]), 0
        self.growth, self.backoff, self.interval = (s["growth_factor"], s["backoff_factor"],
                                                    s["growth_interval"])

    def unscale(self, grads):
        """-> (unscaled grads, found_inf)."""
        inv = np.float32(1.0 / float(self.scale))
        found = any(not np.isfinite(g).all() for g in grads.values())
        if inv != 1:
            grads = {n: g * inv for n, g in grads.items()}
        return grads, found

    def update(self, found_inf):
        with np.errstate(over="ignore"):
            if found_inf:
                self.scale, self.tracker = np.float32(float(self.scale) * self.backoff), 0
            elif self.tracker + 1 == self.interval:
                grown = np.float32(float(self.scale) * self.growth)
                self.scale = grown if np.isfinite(grown) else self.scale
                self.tracker = 0
            else:
                self.tracker += 1


class Adam:
    """torch.optim.Adam / AdamW (decoupled), single-tensor: t ← t + 1; g ← g + wd·p (Adam) or
    p ← p·(1 − lr·wd) (AdamW); m ← lerp(m, g, 1 − β₁); v ← β₂·v + (1 − β₂)·g²;
    p ← p − (lr/(1 − β₁ᵗ))·m / (√v/√(1 − β₂ᵗ) + eps), the bias corrections Python floats.
    lerp as the CPU kernel: m + w·(g − m) for a weight w < 0.5, else g − (g − m)·(1 − w)."""

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 decoupled=False):
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.weight_decay, self.amsgrad, self.decoupled = weight_decay, amsgrad, decoupled
        self.t, self.m, self.v, self.vmax = 0, {}, {}, {}

    def step(self, params, grads):
        self.t += 1                      # every parameter steps together here
        b1, b2, lr, wd = self.beta1, self.beta2, self.lr, self.weight_decay
        step_size = lr / (1 - b1 ** self.t)
        bc2_sqrt = (1 - b2 ** self.t) ** 0.5
        for name, p in params.items():
            g, tp = grads[name], p.dtype.type
            m = self.m.get(name, np.zeros_like(p))
            v = self.v.get(name, np.zeros_like(p))
            if wd and self.decoupled:
                p = p * tp(1 - lr * wd)
            elif wd:
                g = g + p * tp(wd)
            w = 1 - b1
            m = m + tp(w) * (g - m) if w < 0.5 else g - (g - m) * tp(1 - w)
            v = v * tp(b2) + g * g * tp(1 - b2)
            if self.amsgrad:
                v_used = self.vmax[name] = np.maximum(self.vmax.get(name, np.zeros_like(p)), v)
            else:
                v_used = v
            denom = np.sqrt(v_used) / tp(bc2_sqrt) + tp(self.eps)
            params[name] = p + tp(-step_size) * (m / denom)
            self.m[name], self.v[name] = m, v


def make_optimizer(settings):
    """The spec's optimizer object -> SGD, Adam or AdamW (AdamW's weight decay defaults to 0.01)."""
    opt = dict(settings)
    name = opt.pop("name")
    if name == "sgd":
        return SGD(**opt)
    if name == "adamw":
        opt.setdefault("weight_decay", 1e-2)
    return Adam(**opt, decoupled=name == "adamw")


# --- a case: read, run, write ----------------------------------------------------------------
def run_case(case, tensors, isolate=False):
    spec = case["spec"]
    check_supported(spec)
    x, target = tensors["inputs.x"], tensors["inputs.target"]
    params = {k[len("init."):]: v.copy() for k, v in tensors.items()
              if k.startswith("init.") and not k.endswith(BUFFERS)}
    buffers = {k[len("init."):]: v.copy() for k, v in tensors.items()
               if k.startswith("init.") and k.endswith(BUFFERS)}
    n_hidden = len(spec["sizes"]) - 2
    out = {}
    if spec.get("autocast") is not None:       # one step's forward/backward, unscaled (dloss = 1)
        amp = AutocastMLP(spec, {k: v.copy() for k, v in params.items()})
        _, cache = amp.forward(x, target, out)
        amp.backward(cache, out, np.float32(1))
    else:
        mlp = MLP(spec, {k: v.copy() for k, v in params.items()}, dict(buffers))
        feed = tensors if isolate else None
        masks = {i: tensors[f"inputs.masks.layers.{i}"]
                 for i in range(n_hidden)} if spec.get("dropout", 0.0) else None
        _, cache = mlp.forward(x, target, out, feed, masks)
        mlp.backward(cache, out, feed)
    out.update(train(spec, tensors, params, buffers))
    return out


def micro_batches(spec, tensors):
    """(x, target, rows) of every micro-batch of the run in order: the full batch each time, or
    the rows of train.batch_indices batch after batch; rows: where its dropout masks are in
    train.masks.* (the next rows, as many as the batch has samples)."""
    x, target = tensors["inputs.x"], tensors["inputs.target"]
    sizes, start = tensors.get("train.batch_sizes"), 0
    for b in range(spec["steps"] * spec.get("accumulate", 1)):
        if sizes is None:
            xb, tb = x, target
        else:
            idx = tensors["train.batch_indices"][start:start + sizes[b]]
            xb, tb = x[idx], target[idx]
        yield xb, tb, slice(start, start + xb.shape[0])
        start += xb.shape[0]


def accumulated_step(mlp, micro, tensors, stats):
    """One optimizer step's gradients over its k micro-batches: each backward seeded with 1/k
    (the backward of loss / k), the gradients summed in micro-batch order ((g₁ + g₂) + g₃, as
    AccumulateGrad), the loss Σ (loss_i / k).  stats: batch norm's running statistics after each
    forward are appended.  -> (grads, loss)."""
    t = mlp.params["layers.0.weight"].dtype.type
    k, grads, loss = len(micro), None, None
    n_hidden = mlp.n_layers - 1
    for xb, tb, rows in micro:
        masks = {i: tensors[f"train.masks.layers.{i}"][rows]
                 for i in range(n_hidden)} if mlp.dropout else None
        loss_i, cache = mlp.forward(xb, tb, {}, masks=masks)
        for name in stats:
            stats[name].append(mlp.buffers[name])
        g = mlp.backward(cache, {}, dloss=t(1) / t(k))
        grads = g if grads is None else {n: grads[n] + g[n] for n in grads}
        loss = loss_i / t(k) if loss is None else loss + loss_i / t(k)
    return grads, loss


def train(spec, tensors, params, buffers):
    """`steps` optimizer steps from init.* (each over `accumulate` micro-batches; clipping, the
    schedule's rate, autocast and a GradScaler as the spec says) -> the train.* and final.*
    tensors: the loss of each step before its update and the per-step records."""
    sgd = make_optimizer(spec["optimizer"])
    rates = learning_rates(spec.get("lr_schedule"), sgd.lr, spec["steps"])
    amp = spec.get("autocast") is not None
    model = (AutocastMLP if amp else MLP)(spec, {k: v.copy() for k, v in params.items()},
                                          *(() if amp else (dict(buffers),)))
    mlp = model.mlp if amp else model
    scaler = GradScaler(spec["grad_scaler"]) if spec.get("grad_scaler") not in (None, False) else None
    clip = spec.get("clip_grad_norm")
    stats = {name: [] for name in buffers if not name.endswith("num_batches_tracked")}
    rec = {name: [] for name in ("train.losses", "train.clip.total_norm", "train.clip.coef",
                                 "train.scaler.scale", "train.scaler.found_inf", "train.skipped")}
    step_grads = {name: [] for name in mlp.params}
    batches, k = micro_batches(spec, tensors), spec.get("accumulate", 1)
    for step in range(spec["steps"]):
        sgd.lr = rates[step]
        micro = [next(batches) for _ in range(k)]
        if amp:         # autocast: clipping inside, after the scaler's unscale
            grads, loss, stepped = autocast_step(model, micro, scaler, clip, rec)
            if clip is not None or k > 1:   # what the optimizer is given (unscaled, clipped)
                for name, g in grads.items():
                    step_grads[name].append(g)
        else:
            grads, loss = accumulated_step(mlp, micro, tensors, stats)
            stepped = True
            for name, g in grads.items():
                step_grads[name].append(g)
            if clip is not None:
                grads, total, coef = clip_grad_norm(grads, clip["max_norm"],
                                                    clip.get("norm_type", 2))
                rec["train.clip.total_norm"].append(total)
                rec["train.clip.coef"].append(coef)
        if stepped:
            sgd.step(mlp.params, grads)
        rec["train.losses"].append(loss)
    dtype = params["layers.0.weight"].dtype
    out = {"train.lr": np.array(rates, dtype=np.float64)}
    for name, values in rec.items():
        if values:
            out[name] = np.array(values, dtype=np.bool_ if isinstance(values[0], bool) else
                                 (np.float32 if name.startswith("train.scaler") else dtype))
    out.update({f"train.grads.{n}": np.stack(g) for n, g in step_grads.items() if g})
    out.update({f"train.{name}": np.stack(per_step) for name, per_step in stats.items()})
    out.update({f"final.{name}": p for name, p in mlp.params.items()})
    out.update({f"final.{name}": b for name, b in mlp.buffers.items()})
    if scaler is not None:
        out["final.scaler.scale"] = np.asarray(scaler.scale, dtype=np.float32)
        out["final.scaler.growth_tracker"] = np.asarray(scaler.tracker, dtype=np.int64)
    return out


def autocast_step(model, micro, scaler, clip, rec):
    """One autocast optimizer step over its k micro-batches, as the stock script: each backward
    starts from S / k (no scaler: 1 / k; float32, one rounding), the float32 gradients are summed
    in micro-batch order; with a scaler they are unscaled (before clipping, as scaler.unscale_)
    and a step with a non-finite gradient is skipped (its scale, found_inf and skip into rec;
    the scale updated after the step).  Clipping, when on, runs here on the unscaled sums (an
    overflow step's total norm comes out inf or NaN, as on both refnet sides).
    -> (grads, loss, whether to step)."""
    k = np.float32(len(micro))
    seed = (np.float32(1) if scaler is None else scaler.scale) / k
    grads = loss = None
    for xb, tb, _ in micro:
        loss_i, cache = model.forward(xb, tb, {})
        g = model.backward(cache, {}, seed)
        grads = g if grads is None else {n: grads[n] + g[n] for n in grads}
        loss = loss_i / k if loss is None else loss + loss_i / k
    found = False
    if scaler is not None:
        rec["train.scaler.scale"].append(scaler.scale)
        grads, found = scaler.unscale(grads)
        rec["train.scaler.found_inf"].append(found)
        rec["train.skipped"].append(found)
    if clip is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            grads, total, coef = clip_grad_norm(grads, clip["max_norm"], clip.get("norm_type", 2))
        rec["train.clip.total_norm"].append(total)
        rec["train.clip.coef"].append(coef)
    if scaler is not None:
        scaler.update(found)
    return grads, loss, not found


def main(argv):
    isolate = "--isolate" in argv
    argv = [a for a in argv if a != "--isolate"]
    if len(argv) != 2:
        print("usage: python ports/numpy_port/port.py [--isolate] FIXTURE_DIR OUT_DIR", file=sys.stderr)
        return 2
    fixtures, out_dir = argv
    try:
        with open(os.path.join(fixtures, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"manifest.json: schema_version {manifest.get('schema_version')!r}, "
                             f"this port reads {SCHEMA_VERSION}")
        for case in manifest["cases"]:          # refuse before computing or writing anything
            try:
                check_supported(case["spec"])
                if isolate and case["spec"].get("autocast") is not None:
                    raise ValueError("--isolate is not supported by the NumPy port for autocast")
            except ValueError as exc:
                raise ValueError(f"case {case.get('name')!r}: {exc}") from None
        os.makedirs(out_dir, exist_ok=True)
        written = []
        for case in manifest["cases"]:
            tensors = read_safetensors(os.path.join(fixtures, case["file"]))
            out = run_case(case, tensors, isolate)
            order = [e["name"] for e in case["tensors"] if e["kind"] is not None]
            path = os.path.join(out_dir, case["file"])
            dtypes = {e["name"]: e["dtype"] for e in case["tensors"]}
            write_safetensors(path, {name: out[name] for name in order}, dtypes)
            with open(path, "rb") as f:
                written.append({"name": case["name"], "file": case["file"],
                                "sha256": hashlib.sha256(f.read()).hexdigest()})
            print(f"{case['name']}: wrote {len(order)} tensors to {path}")
        port_manifest = {"schema_version": SCHEMA_VERSION, "port": "numpy " + np.__version__,
                         "isolate": isolate,
                         "fixtures": os.path.abspath(fixtures), "cases": written}
        _write_atomic(os.path.join(out_dir, "manifest.json"),
                      (json.dumps(port_manifest, indent=1) + "\n").encode())
    except (OSError, ValueError, KeyError) as exc:
        print(f"numpy port: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
