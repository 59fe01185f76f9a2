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
DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8")}
NAMES = {v: k for k, v in DTYPES.items()}


# --- file format ----------------------------------------------------------------------------
def read_safetensors(path):
    """-> {name: array}.  u64 LE header length n, n bytes of JSON, then raw LE C-order data."""
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
        out[name] = np.frombuffer(data[begin:end], dtype=dt).reshape(shape).astype(dt.newbyteorder("="))
    return out


def write_safetensors(path, tensors):
    """Write {name: array} in the given order (atomically: temp file + rename)."""
    header, chunks, offset = {}, [], 0
    for name, a in tensors.items():
        a = np.asarray(a)
        if not a.flags.c_contiguous:
            a = a.copy(order="C")   # (np.ascontiguousarray would turn a scalar's shape [] into [1])
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": NAMES[a.dtype.newbyteorder("<")], "shape": list(a.shape),
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


# --- losses: forward(out, target) -> (loss, cache); backward(cache) -> dL/dout (dL = 1) --------
def sum_squared_forward(out, target):
    diff = out - target
    sq = diff * diff
    return sq.sum(dtype=sq.dtype), diff           # L = Σ (out − target)²


def sum_squared_backward(diff):
    return 2.0 * diff * diff.dtype.type(1)        # dL/dout = 2·diff


def mse_forward(out, target):
    diff = out - target
    sq = diff * diff
    return sq.mean(dtype=sq.dtype), diff          # L = mean (out − target)²


def mse_backward(diff):
    return diff.dtype.type(2.0 / diff.size) * diff  # dL/dout = (2/numel)·diff, 2/numel in double


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


def cross_entropy_backward(cache):
    logp, labels = cache
    n = logp.shape[0]
    dlogp = np.zeros_like(logp)
    dlogp[np.arange(n), labels] = -(logp.dtype.type(1) / logp.dtype.type(n))  # nll: −1/N at tᵢ
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


def svm_backward(cache):
    active, labels, dt = cache
    n, c = active.shape
    dy = np.where(active, dt.type(1.0 / (n * c)), dt.type(0))       # 1/(N·C) per active j ≠ tᵢ
    dy_target = np.zeros(n, dtype=dt)
    for j in range(c):                                             # −Σ_j, class by class
        dy_target = dy_target - dy[:, j]
    dy[np.arange(n), labels] = dy_target
    return dy


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


def l2_backward(weights, reg):
    g = weights[0].dtype.type(reg)                # dloss·reg with dloss = 1
    return [g * (2.0 * w) for w in weights]       # ∂R/∂W = (g·reg)·(2W)


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
        self.buffers = buffers if buffers is not None else {}   # "norms.{i}.running_mean" …

    def weights(self):
        return [self.params[f"layers.{i}.weight"] for i in range(self.n_layers)]

    def forward(self, x, target, trace, feed=None, masks=None):
        """Forward, recording every intermediate in `trace`.  With `feed` (the fixtures), each op
        takes its input from the fixture instead of from the op before it (--isolate).
        masks: {i: the 0/1 dropout mask (N, H) of hidden layer i} when the spec has dropout."""
        caches, h = [], x
        if self.embedding is not None:               # integer x (N, T) -> (N, T·E)
            h = record(trace, feed, "forward.embed.output",
                       embedding_forward(x, self.params["embed.weight"]))
        for i in range(self.n_layers):
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
        return loss, (caches, loss_cache, x)

    def backward(self, cache, trace, feed=None):
        caches, loss_cache, x = cache
        dh = record(trace, feed, "backward.grad_output", LOSSES[self.loss][1](loss_cache))
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
        if self.reg:  # the second use of each W: its gradient is added to the data gradient (one add)
            for i, dw_reg in enumerate(l2_backward(self.weights(), self.reg)):
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
                  "autocast", "grad_scaler"}
SPEC_KEYS_IGNORED = {"name", "data", "n_samples", "seed", "init", "device"}  # inputs come from the file
# the training step's keys (clipping, accumulation, schedules, FFN blocks): not implemented here,
# accepted only at their "off" value
SPEC_KEYS_OFF = {"clip_grad_norm": None, "accumulate": 1, "lr_schedule": None, "blocks": None}
SGD_SETTINGS = {"lr", "momentum", "dampening", "nesterov", "weight_decay"}
EMBEDDING_KEYS = {"vocab", "dim", "context"}


def _number(v):
    return not isinstance(v, bool) and isinstance(v, (int, float))


def check_supported(spec):
    """Raise ValueError (one line ending 'not supported by the NumPy port') for anything the port
    does not implement, so that it refuses a case before computing or writing anything."""
    unknown = sorted(set(spec) - SPEC_KEYS_READ - SPEC_KEYS_IGNORED - set(SPEC_KEYS_OFF))
    if unknown:
        raise ValueError(f"spec key(s) {unknown} are not supported by the NumPy port")
    for key, off in SPEC_KEYS_OFF.items():
        if spec.get(key, off) != off:
            raise ValueError(f"{key} {spec[key]!r} is not supported by the NumPy port (only {off!r})")
    for key in ("autocast", "grad_scaler"):      # mixed precision: not in this port
        if spec.get(key) not in (None, False):
            raise ValueError(f"{key} {spec[key]!r} is not supported by the NumPy port (null)")
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
    if opt.get("name") != "sgd":
        raise ValueError(f"optimizer {opt.get('name')!r} is not supported by the NumPy port (sgd)")
    rest = sorted(set(opt) - SGD_SETTINGS - {"name"})
    if rest:
        raise ValueError(f"optimizer settings {rest} are not supported by the NumPy port")
    reg = spec.get("reg", 0.0)
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not 0 <= reg < float("inf"):
        raise ValueError(f"reg {reg!r} is not supported by the NumPy port (a finite number >= 0)")


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


# --- a case: read, run, write ----------------------------------------------------------------
def run_case(case, tensors, isolate=False):
    spec = case["spec"]
    check_supported(spec)
    opt = dict(spec["optimizer"])
    opt.pop("name")
    x, target = tensors["inputs.x"], tensors["inputs.target"]
    params = {k[len("init."):]: v.copy() for k, v in tensors.items()
              if k.startswith("init.") and not k.endswith(BUFFERS)}
    buffers = {k[len("init."):]: v.copy() for k, v in tensors.items()
               if k.startswith("init.") and k.endswith(BUFFERS)}
    dtype = params["layers.0.weight"].dtype
    n_hidden = len(spec["sizes"]) - 2
    dropout = spec.get("dropout", 0.0)
    out = {}
    mlp = MLP(spec, params, dict(buffers))
    feed = tensors if isolate else None
    masks = {i: tensors[f"inputs.masks.layers.{i}"] for i in range(n_hidden)} if dropout else None
    _, cache = mlp.forward(x, target, out, feed, masks)
    mlp.backward(cache, out, feed)

    # training: `steps` full-batch (or given mini-batch) steps, the loss of each before its update;
    # step s applies the next rows of train.masks.* (as many as the step has samples)
    mlp = MLP(spec, {k: v.copy() for k, v in params.items()}, dict(buffers))
    sgd, losses = SGD(**opt), []
    stats = {name: [] for name in buffers if not name.endswith("num_batches_tracked")}
    sizes = tensors.get("train.batch_sizes")
    start = 0
    for step in range(spec["steps"]):
        if sizes is None:
            xb, tb = x, target
        else:
            idx = tensors["train.batch_indices"][start:start + sizes[step]]
            xb, tb = x[idx], target[idx]
        rows = slice(start, start + xb.shape[0])
        start += xb.shape[0]
        step_masks = {i: tensors[f"train.masks.layers.{i}"][rows]
                      for i in range(n_hidden)} if dropout else None
        loss, cache = mlp.forward(xb, tb, {}, masks=step_masks)
        grads = mlp.backward(cache, {})
        sgd.step(mlp.params, grads)
        losses.append(loss)
        for name in stats:
            stats[name].append(mlp.buffers[name])
    out["train.losses"] = np.array(losses, dtype=dtype)
    for name, per_step in stats.items():
        out[f"train.{name}"] = np.stack(per_step)
    for name, p in mlp.params.items():
        out[f"final.{name}"] = p
    for name, b in mlp.buffers.items():
        out[f"final.{name}"] = b
    return out


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
            except ValueError as exc:
                raise ValueError(f"case {case.get('name')!r}: {exc}") from None
        os.makedirs(out_dir, exist_ok=True)
        written = []
        for case in manifest["cases"]:
            tensors = read_safetensors(os.path.join(fixtures, case["file"]))
            out = run_case(case, tensors, isolate)
            order = [e["name"] for e in case["tensors"] if e["kind"] is not None]
            path = os.path.join(out_dir, case["file"])
            write_safetensors(path, {name: out[name] for name in order})
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
