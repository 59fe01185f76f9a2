"""Golden fixtures for ports (`refnet export`): every intermediate of a known-good run, in files
any language reads.

Layout of a fixture directory (docs/porting.md documents it for port authors):

    manifest.json                      schema version, per case: spec, file, sha256, tensor list
    <example>.<dtype>.safetensors      one file per case: inputs, forward, backward, training

Tensor files are safetensors (refnet.tensorfile); refnet.portcheck reads them back and compares a
port's outputs with them.

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
import json
import os
import shutil
import tempfile

import torch

from refnet import data as datasets
from refnet.compare import TOLERANCES, ULP_LIMIT
from refnet.harness import build_pair, curve_checks, gradient_checks
from refnet.spec import Spec
from refnet.tensorfile import ST_DTYPES, encode_safetensors, sha256_file

SCHEMA_VERSION = 1
FORMAT = "refnet-golden"
MANIFEST = "manifest.json"
EXPORT_STEPS = 8          # default length of a fixture's training run (kept short: small files)


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
    spec = Spec.from_dict({**case["spec"].to_dict(), "device": "cpu"})
    dtype = spec.torch_dtype
    x, target = case["data"] if case["data"] is not None else datasets.load_data(spec)
    x = x.detach().to(dtype=dtype, device="cpu")
    target = target.detach().cpu()
    if target.is_floating_point():
        target = target.to(dtype)
    pair = build_pair(spec, case["params"])
    init = {name: p.clone() for name, p in pair.mlp.params.items()}
    index_list = datasets.batches(x.shape[0], spec.batch_size, spec.steps, spec.seed)
    minibatch = index_list[0] is not None

    trace = {}
    _, cache = pair.mlp.forward(x, target, trace=trace)  # the loss is traced as forward.loss
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
                             "see docs/porting.md",
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
                entry = {"name": name, "role": role, "dtype": ST_DTYPES[t.dtype],
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
