"""A port of refnet's manual MLP to NumPy: the worked example of the porting workflow.

    python ports/numpy_port/port.py [--isolate] FIXTURE_DIR OUT_DIR
    refnet check-port OUT_DIR --fixtures FIXTURE_DIR

--isolate feeds every op the fixture's value of its input instead of the port's own (the
backward of layer i starts from the fixture's grad_pre_activation, and so on), so each op is
checked on its own and an error does not smear into everything after it.

It imports numpy and the standard library only (a test enforces it) and is written the way a C
port would be: a safetensors reader and writer by hand, one forward and one backward function per
op, and the computation in the explicit canonical order of the fixtures (README.md, "Porting
kit").  For every case of FIXTURE_DIR/manifest.json it reads the inputs and initial parameters,
runs forward, backward and the short training run, and writes every intermediate under the
fixture's names to OUT_DIR/<case>.safetensors, then OUT_DIR/manifest.json.

Shapes: N batch, D inputs, H units of a layer, C outputs.  Parameters in nn.Linear layout:
weight (H, D), bias (H,).
"""
import hashlib
import json
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
               "identity": (identity_forward, identity_backward, None)}


# --- losses ---------------------------------------------------------------------------------
def loss_forward(name, out, target):
    diff = out - target
    sq = diff * diff
    if name == "sum_squared":
        return sq.sum(dtype=sq.dtype), diff       # L = Σ (out − target)²
    if name == "mse":
        return sq.mean(dtype=sq.dtype), diff      # L = mean (out − target)²
    raise ValueError(f"loss {name!r} is not supported by the NumPy port")


def loss_backward(name, diff):
    if name == "sum_squared":
        return 2.0 * diff * diff.dtype.type(1)    # dL/dout = 2·diff
    return diff.dtype.type(2.0 / diff.size) * diff  # dL/dout = (2/numel)·diff


# --- the MLP ----------------------------------------------------------------------------------
class MLP:
    def __init__(self, spec, params):
        self.params = params
        self.n_layers = len(spec["sizes"]) - 1
        act = spec["activation"]
        self.acts = [act] * (self.n_layers - 1) if isinstance(act, str) else list(act)
        self.loss = spec["loss"]
        self.options = {"slope": spec["slope"], "alpha": spec["alpha"], "k": spec["k"]}
        self.bias = spec["bias"]
        for a in self.acts:
            if a not in ACTIVATIONS:
                raise ValueError(f"activation {a!r} is not supported by the NumPy port")

    def forward(self, x, target, trace, feed=None):
        """Forward, recording every intermediate in `trace`.  With `feed` (the fixtures), each op
        takes its input from the fixture instead of from the op before it (--isolate)."""
        caches, h = [], x
        for i in range(self.n_layers):
            w, b = self.params[f"layers.{i}.weight"], self.params.get(f"layers.{i}.bias")
            z = record(trace, feed, f"forward.layers.{i}.pre_activation", linear_forward(h, w, b))
            act_cache = None
            if i < self.n_layers - 1:
                fwd, _, opt = ACTIVATIONS[self.acts[i]]
                y, act_cache = fwd(z, self.options[opt]) if opt else fwd(z)
                fed = record(trace, feed, f"forward.layers.{i}.activation", y)
                act_cache, y = (fed if act_cache is y else act_cache), fed
            else:
                y = z
            caches.append((h, act_cache))
            h = y
        h = record(trace, feed, "forward.output", h)
        loss, diff = loss_forward(self.loss, h, target)
        trace["forward.loss"] = np.asarray(loss, dtype=h.dtype)
        return loss, (caches, diff)

    def backward(self, cache, trace, feed=None):
        caches, diff = cache
        dh = record(trace, feed, "backward.grad_output", loss_backward(self.loss, diff))
        grads = {}
        for i in reversed(range(self.n_layers)):
            x_in, act_cache = caches[i]
            if i < self.n_layers - 1:
                dh = record(trace, feed, f"backward.layers.{i}.grad_activation", dh)
                dh = ACTIVATIONS[self.acts[i]][1](dh, act_cache)
            dh = record(trace, feed, f"backward.layers.{i}.grad_pre_activation", dh)
            dh, dw, db = linear_backward(dh, x_in, self.params[f"layers.{i}.weight"], self.bias)
            grads[f"layers.{i}.weight"] = dw
            trace[f"grads.layers.{i}.weight"] = dw
            if self.bias:
                grads[f"layers.{i}.bias"] = db
                trace[f"grads.layers.{i}.bias"] = db
        trace["backward.grad_input"] = dh
        return grads


def record(trace, feed, name, value):
    """Keep our value for the output file; go on with the fixture's value when isolating."""
    trace[name] = value
    return value if feed is None else feed[name]


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
    opt = dict(spec["optimizer"])
    if opt.pop("name") != "sgd":
        raise ValueError(f"optimizer {spec['optimizer']['name']!r} is not supported by the NumPy port")
    x, target = tensors["inputs.x"], tensors["inputs.target"]
    params = {k[len("init."):]: v.copy() for k, v in tensors.items() if k.startswith("init.")}
    out = {}
    mlp = MLP(spec, params)
    feed = tensors if isolate else None
    _, cache = mlp.forward(x, target, out, feed)
    mlp.backward(cache, out, feed)

    # training: `steps` full-batch (or given mini-batch) steps, the loss of each before its update
    mlp, sgd, losses = MLP(spec, {k: v.copy() for k, v in params.items()}), SGD(**opt), []
    sizes = tensors.get("train.batch_sizes")
    start = 0
    for step in range(spec["steps"]):
        if sizes is None:
            xb, tb = x, target
        else:
            idx = tensors["train.batch_indices"][start:start + sizes[step]]
            start += sizes[step]
            xb, tb = x[idx], target[idx]
        loss, cache = mlp.forward(xb, tb, {})
        grads = mlp.backward(cache, {})
        sgd.step(mlp.params, grads)
        losses.append(loss)
    out["train.losses"] = np.array(losses, dtype=x.dtype)
    for name, p in mlp.params.items():
        out[f"final.{name}"] = p
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
