"""Golden fixtures for ports: every intermediate of a known-good run, in files any language reads.

Layout of a fixture directory (README.md, "Porting kit", documents it for port authors):

    manifest.json                      schema version, per case: spec, file, sha256, tensor list
    <example>.<dtype>.safetensors      one file per case: inputs, forward, backward, training

Tensor files are safetensors: an unsigned 64-bit little-endian header length n, n bytes of JSON
``{name: {"dtype": "F32"|"F64"|"I64", "shape": [...], "data_offsets": [begin, end]}, ...}``, then
the raw little-endian, C-order data; offsets count from the first byte after the header.  Written
here with the standard library (tests check it against the `safetensors` package both ways).

Canonical order (`tensor_order`): the order the computation produces the values.  "first differs
at" in `refnet check-port` is the first tensor in this order whose tier is not bitwise.

    inputs.x, inputs.target, init.layers.{i}.weight/.bias (i = 0…L−1),
    [train.batch_sizes, train.batch_indices: only when the training run uses mini-batches]
    forward.layers.{i}.pre_activation, forward.layers.{i}.activation (hidden layers only), …,
    forward.output, forward.loss,
    backward.grad_output, then for i = L−1 … 0: backward.layers.{i}.grad_activation (hidden only),
    backward.layers.{i}.grad_pre_activation, grads.layers.{i}.weight, grads.layers.{i}.bias,
    backward.grad_input,
    train.losses (one per step, before its update), final.layers.{i}.weight/.bias
"""
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile

import torch

SCHEMA_VERSION = 1
FORMAT = "refnet-golden"
MANIFEST = "manifest.json"
EXPORT_STEPS = 8          # default length of a fixture's training run (kept short: small files)

_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}
_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}
_ST_SIZE = {"F32": 4, "F64": 8, "I64": 8}
_MAX_HEADER = 100 * 1024 * 1024


# --- safetensors, by hand --------------------------------------------------------------------
def encode_safetensors(tensors, metadata=None):
    """tensors: ordered {name: tensor} (F32/F64/I64, any device) -> the file's bytes."""
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in _ST_DTYPES:
            raise TypeError(f"tensors[{name!r}]: expected a float32, float64 or int64 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        a = t.detach().cpu().contiguous().numpy()
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # pad to 8 bytes so data is aligned (the format allows spaces)
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def decode_safetensors(blob, where="file"):
    """bytes -> ({name: tensor} in file order, metadata).  Errors: ValueError naming `where`."""
    if len(blob) < 8:
        raise ValueError(f"{where}: truncated (only {len(blob)} bytes; no safetensors header)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > _MAX_HEADER or 8 + n > len(blob):
        raise ValueError(f"{where}: truncated or not safetensors (header length {n}, file "
                         f"{len(blob)} bytes)")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: corrupted safetensors header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: corrupted safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(blob)[8 + n:]
    out = []
    for name, info in header.items():
        try:
            dt, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: tensor {name!r}: header entry needs dtype, shape and "
                             f"data_offsets") from None
        if dt not in _ST_TORCH:
            raise ValueError(f"{where}: tensor {name!r}: dtype {dt!r} not supported; expected one "
                             f"of {', '.join(_ST_TORCH)}")
        numel = math.prod(shape)
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= len(data)) \
                or end - begin != numel * _ST_SIZE[dt]:
            raise ValueError(f"{where}: tensor {name!r}: data_offsets {[begin, end]} do not fit "
                             f"shape {shape} {dt} in {len(data)} data bytes (truncated?)")
        out.append((begin, name, dt, shape))
    tensors = {}
    for begin, name, dt, shape in sorted(out):
        end = begin + math.prod(shape) * _ST_SIZE[dt]
        t = torch.frombuffer(bytearray(data[begin:end]), dtype=_ST_TORCH[dt]) if end > begin \
            else torch.empty(0, dtype=_ST_TORCH[dt])
        tensors[name] = t.reshape(shape)
    return tensors, metadata


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- what a case contains ----------------------------------------------------------------------
def tensor_order(n_layers, bias=True, minibatch=False):
    """[(name, role, kind)] in canonical order; role input|forward|backward|train, kind is the
    TOLERANCES kind a port's value is checked with (None for inputs, which a port only reads)."""
    rows = [("inputs.x", "input", None), ("inputs.target", "input", None)]
    kinds = ("weight", "bias") if bias else ("weight",)
    rows += [(f"init.layers.{i}.{k}", "input", None) for i in range(n_layers) for k in kinds]
    if minibatch:
        rows += [("train.batch_sizes", "input", None), ("train.batch_indices", "input", None)]
    for i in range(n_layers):
        rows.append((f"forward.layers.{i}.pre_activation", "forward", "forward"))
        if i < n_layers - 1:
            rows.append((f"forward.layers.{i}.activation", "forward", "forward"))
    rows += [("forward.output", "forward", "forward"), ("forward.loss", "forward", "forward"),
             ("backward.grad_output", "backward", "grad")]
    for i in reversed(range(n_layers)):
        if i < n_layers - 1:
            rows.append((f"backward.layers.{i}.grad_activation", "backward", "grad"))
        rows.append((f"backward.layers.{i}.grad_pre_activation", "backward", "grad"))
        rows += [(f"grads.layers.{i}.{k}", "backward", "grad") for k in kinds]
    rows.append(("backward.grad_input", "backward", "grad"))
    rows.append(("train.losses", "train", "curve"))
    rows += [(f"final.layers.{i}.{k}", "train", "curve") for i in range(n_layers) for k in kinds]
    return rows


def case_for_spec(spec, params=None, data=None, note=""):
    """A case to export: {"spec", "params" (or None: seeded init), "data" (x, target) or None}."""
    layers = [k for k in ("norm", "dropout", "embedding") if getattr(spec, k, None)]
    if layers:  # the fixture format has no running statistics or dropout masks yet
        raise ValueError(f"export: spec key(s) {layers} are not exported yet (fixtures would need "
                         f"running statistics and dropout masks); verify and train support them")
    return {"spec": spec, "params": params, "data": data, "note": note}


def run_case(case):
    """Run the manual MLP on a case (CPU) -> (ordered {name: tensor}, reference tiers vs autograd).

    The values are the manual MLP's; the same run is repeated on the autograd twin and the tier of
    each tensor autograd exposes is recorded (bitwise on CPU for every shipped example).
    """
    from refnet import data as datasets
    from refnet.harness import build_pair, curve_checks, gradient_checks, load_data
    from refnet.spec import Spec

    spec = Spec.from_dict({**case["spec"].to_dict(), "device": "cpu"})
    dtype = spec.torch_dtype
    x, target = case["data"] if case["data"] is not None else load_data(spec)
    x = x.detach().to(dtype=dtype, device="cpu")
    target = target.detach().cpu()
    if target.is_floating_point():
        target = target.to(dtype)
    pair = build_pair(spec, case["params"])
    init = {name: p.clone() for name, p in pair.mlp.params.items()}
    index_list = datasets.batches(x.shape[0], spec.batch_size, spec.steps, spec.seed)
    minibatch = index_list[0] is not None

    trace = {}
    loss, cache = pair.mlp.forward(x, target, trace=trace)
    grads, dx = pair.mlp.backward(cache, trace=trace)
    values = {"inputs.x": x, "inputs.target": target}
    values.update({f"init.{n}": p for n, p in init.items()})
    if minibatch:
        # step s uses rows batch_indices[sum(batch_sizes[:s]) : sum(batch_sizes[:s+1])]
        values["train.batch_sizes"] = torch.tensor([len(i) for i in index_list], dtype=torch.int64)
        values["train.batch_indices"] = torch.cat([i.to(torch.int64) for i in index_list])
    for name, t in trace.items():
        stage = "backward" if name.startswith("grad") or ".grad_" in name else "forward"
        values[f"{stage}.{name}"] = t
    values.update({f"grads.{n}": g for n, g in grads.items()})
    values["backward.grad_input"] = dx

    reference = {}
    for v in gradient_checks(build_pair(spec, init), x, target):
        key = {"loss": "forward.loss", "output": "forward.output",
               "input.grad": "backward.grad_input"}.get(v.name, f"grads.{v.name[:-5]}")
        reference[key] = v.tier
    verdicts, (losses, _) = curve_checks(pair, x, target, spec.steps, spec.batch_size, spec.seed)
    reference["train.losses"] = verdicts[0].tier
    for v in verdicts[1:]:
        reference[v.name] = v.tier
    values["train.losses"] = losses
    values.update({f"final.{n}": p for n, p in pair.mlp.params.items()})

    order = tensor_order(pair.mlp.n_layers, spec.bias, minibatch)
    missing = [n for n, _, _ in order if n not in values]
    if missing or len(values) != len(order):
        raise RuntimeError(f"export: traced names {sorted(values)} do not match the canonical "
                           f"order (missing {missing})")
    return spec, {n: values[n].detach().cpu().contiguous() for n, _, _ in order}, order, reference


# --- export --------------------------------------------------------------------------------------
def export(out, cases, force=False):
    """Write fixtures for cases [(case name, case dict)] into directory `out`, atomically.

    Everything is written into a temporary directory next to `out` (manifest last) and renamed
    into place at the end: a killed export leaves `out` as it was.  Returns the manifest.
    """
    from refnet.compare import TOLERANCES, ULP_LIMIT
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out: {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ValueError(f"--out: {out} exists and is not empty; pass --force to replace it")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise ValueError(f"--out: parent directory {parent} does not exist")
    names = [n for n, _ in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"export: duplicate case names {names}")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result is an ordinary directory
        manifest = {"schema_version": SCHEMA_VERSION, "format": FORMAT,
                    # float32 values of large GEMMs depend on the thread count and the CPU's
                    # kernels (BLAS blocking/accumulation order); float64 ones did not in our runs
                    "created_with": {"torch": torch.__version__, "device": "cpu",
                                     "threads": torch.get_num_threads(),
                                     "cpu_capability": torch.backends.cpu.get_cpu_capability()},
                    "order": "tensors are listed in the order the computation produces them; "
                             "see README.md 'Porting kit'",
                    "required_tier": "tolerance", "cases": []}
        for case_name, case in cases:
            spec, values, order, reference = run_case(case)
            fname = f"{case_name}.safetensors"
            path = os.path.join(tmp, fname)
            with open(path, "wb") as f:
                f.write(encode_safetensors(values, {"case": case_name, "schema_version": SCHEMA_VERSION}))
                f.flush()
                os.fsync(f.fileno())
            tensors = []
            for name, role, kind in order:
                t = values[name]
                entry = {"name": name, "role": role, "dtype": _ST_DTYPES[t.dtype],
                         "shape": list(t.shape), "kind": kind}
                if kind is not None:
                    rtol, atol = TOLERANCES[spec.torch_dtype][kind]
                    entry.update(rtol=rtol, atol=max(atol, rtol * _scale(t)),
                                 ulp_limit=ULP_LIMIT[spec.torch_dtype], required_tier="tolerance")
                if name in reference:
                    entry["autograd_tier"] = reference[name]
                tensors.append(entry)
            manifest["cases"].append({
                "name": case_name, "dtype": spec.dtype, "file": fname,
                "sha256": sha256_file(path), "bytes": os.path.getsize(path),
                "steps": spec.steps, "note": case.get("note", ""), "spec": spec.to_dict(),
                "tensors": tensors})
        _write_json(os.path.join(tmp, MANIFEST), manifest)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _scale(t):
    """The tensor's largest finite magnitude.  A port's GEMM and reductions sum in another order,
    and an element that is small because its terms cancelled carries an error on the scale of the
    terms, not of itself; so atol is rtol·(largest magnitude), never less than the table's atol."""
    finite = t[torch.isfinite(t)] if t.numel() else t
    return float(finite.abs().max()) if finite.numel() else 0.0


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _swap_into_place(tmp, out):
    if not os.path.exists(out):
        os.replace(tmp, out)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
    os.rmdir(old)
    os.replace(out, old)      # from here until the next line `out` is absent, never partial
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# --- reading fixtures and ports ----------------------------------------------------------------
def read_manifest(directory, what="fixtures"):
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise ValueError(f"{what}: directory not found: {directory}")
    if not os.path.isfile(path):
        raise ValueError(f"{what}: missing {path}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.__class__.__name__}); truncated or "
                         f"corrupted?") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version!r} is not supported; this refnet "
                         f"reads schema_version {SCHEMA_VERSION}")
    if not isinstance(manifest.get("cases"), list):
        raise ValueError(f"{path}: expected a list under 'cases'")
    if what != "port":
        for i, case in enumerate(manifest["cases"]):
            if not isinstance(case, dict) or not {"name", "file", "sha256", "tensors"} <= set(case) \
                    or not isinstance(case["tensors"], list) or not all(
                        isinstance(t, dict) and {"name", "dtype", "shape", "kind"} <= set(t)
                        and (t["kind"] is None or {"rtol", "atol", "ulp_limit"} <= set(t))
                        for t in case["tensors"]):
                raise ValueError(f"{path}: cases[{i}] needs name, file, sha256 and tensors "
                                 f"(each with name, dtype, shape, kind and, when kind is set, "
                                 f"rtol, atol, ulp_limit)")
    return manifest


def load_fixture_case(directory, case):
    """Verify a fixture file's sha256 and header against the manifest -> {name: tensor}."""
    path = os.path.join(directory, case["file"])
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing fixture file (listed in manifest.json)")
    digest = sha256_file(path)
    if digest != case["sha256"]:
        raise ValueError(f"{path}: sha256 mismatch (expected {case['sha256'][:16]}…, got "
                         f"{digest[:16]}…): the fixture file is corrupted or truncated")
    with open(path, "rb") as f:
        tensors, _ = decode_safetensors(f.read(), path)
    for entry in case["tensors"]:
        t = tensors.get(entry["name"])
        if t is None:
            raise ValueError(f"{path}: tensor {entry['name']!r} listed in manifest.json is missing")
        if _ST_DTYPES[t.dtype] != entry["dtype"] or list(t.shape) != entry["shape"]:
            raise ValueError(f"{path}: tensor {entry['name']!r} is {_ST_DTYPES[t.dtype]} "
                             f"{list(t.shape)}, manifest.json says {entry['dtype']} {entry['shape']}")
    return tensors


def check_port(port_dir, fixture_dir):
    """Compare a port's output directory with the fixtures.

    Returns a list of rows {case, name, tier, passed, max_abs_diff, max_ulp, tolerance_used (1.0 is
    the edge), note} in canonical
    order (cases in manifest order).  Fixture problems raise ValueError (one line, naming the file);
    a port's missing file/tensor or wrong dtype/shape is a failed row.
    """
    from refnet.compare import compare_tensors
    fixtures = read_manifest(fixture_dir, "--fixtures")
    port_manifest = None
    if os.path.isfile(os.path.join(port_dir, MANIFEST)):
        port_manifest = read_manifest(port_dir, "port")
    elif not os.path.isdir(port_dir):
        raise ValueError(f"port: directory not found: {port_dir}")
    port_sha = {c.get("file"): c.get("sha256") for c in (port_manifest or {}).get("cases", [])
                if isinstance(c, dict)}
    rows = []
    for case in fixtures["cases"]:
        ref = load_fixture_case(fixture_dir, case)
        path = os.path.join(port_dir, case["file"])
        checked = [e for e in case["tensors"] if e["kind"] is not None]
        if not os.path.isfile(path):
            rows += [_row(case, e, "fail", note=f"missing file {path}") for e in checked]
            continue
        if port_sha.get(case["file"]) and sha256_file(path) != port_sha[case["file"]]:
            raise ValueError(f"{path}: sha256 does not match the port's manifest.json: the port's "
                             f"output file is corrupted or truncated")
        with open(path, "rb") as f:
            got, _ = decode_safetensors(f.read(), path)
        for e in checked:
            t = got.get(e["name"])
            if t is None:
                rows.append(_row(case, e, "fail", note=f"tensor missing from {path}"))
                continue
            if _ST_DTYPES[t.dtype] != e["dtype"] or list(t.shape) != e["shape"]:
                rows.append(_row(case, e, "fail", note=f"{path}: is {_ST_DTYPES[t.dtype]} "
                                 f"{list(t.shape)}, expected {e['dtype']} {e['shape']}"))
                continue
            v = compare_tensors(e["name"], t, ref[e["name"]], e["kind"], rtol=e["rtol"],
                                atol=e["atol"], ulp_limit=e["ulp_limit"],
                                required=e.get("required_tier", "tolerance"))
            row = _row(case, e, v.tier, v.passed, v.max_abs_diff, v.max_ulp,
                       "" if v.passed else v.message())
            row["tolerance_used"] = _tolerance_used(t, ref[e["name"]], e["rtol"], e["atol"])
            rows.append(row)
    return rows


def _tolerance_used(a, b, rtol, atol):
    """max |a − b| / (atol + rtol·|b|) over the elements: 1.0 is the edge of the tolerance."""
    if not a.is_floating_point() or not b.numel():
        return None
    a, b = a.double(), b.double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    used = torch.where(same, 0.0, (a - b).abs() / (atol + rtol * b.abs()))
    return float(torch.nan_to_num(used, nan=math.inf).max())


def _row(case, entry, tier, passed=False, max_abs_diff=None, max_ulp=None, note=""):
    return {"case": case["name"], "name": entry["name"], "tier": tier, "passed": passed,
            "max_abs_diff": max_abs_diff, "max_ulp": max_ulp, "tolerance_used": None, "note": note}
