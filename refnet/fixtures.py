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

The optional layers (norm, dropout, embedding; `tensor_order` lists where) add: init.norms.*,
init.embed.weight and batch norm's initial running statistics; the 0/1 dropout masks of the single
forward (inputs.masks.layers.{i}) and of every training step (train.masks.layers.{i}, rows stacked
in step order); forward.embed.output, forward.layers.{i}.linear, forward.norms.{i}.mean/.invstd
(and the running statistics after that forward), forward.layers.{i}.dropout;
backward.layers.{i}.grad_dropout, .grad_linear, grads.norms.*, grads.embed.weight;
train.norms.{i}.running_mean/_var (steps, H) and final.norms.* (buffers included).  Cases
without these layers are byte for byte what schema_version 1 wrote before them.

Residual FFN blocks add each block's values and gradients (block_tensor_order) between the last
hidden layer and the head.  The training step's keys add per-step records after train.losses (step_tensor_order: the rate,
the summed gradients before clipping, the clip norm and coefficient, the GradScaler's scale,
found_inf and skips); an autocast case has its own order (autocast_tensor_order), every value in
the dtype it has under torch.autocast (BF16/F16 for the low-precision ones).  Each tensor is
graded in its own dtype.
"""
import hashlib
import json
import os
import shutil
import tempfile

import torch

from manual.blocks import block_param_names
from refnet import data as datasets
from refnet.compare import TOLERANCES, ULP_LIMIT, compare_tensors
from refnet.harness import build_pair, curve_checks, gradient_checks
from refnet.spec import Spec
from refnet.tensorfile import ST_DTYPES, encode_safetensors

SCHEMA_VERSION = 1
FORMAT = "refnet-golden"
MANIFEST = "manifest.json"
EXPORT_STEPS = 8          # default length of a fixture's training run (kept short: small files)


# --- what a case contains ----------------------------------------------------------------------
def tensor_order(n_layers, bias=True, minibatch=False, *, norm=None, dropout=False,
                 embedding=False, blocks=None, steps=None):
    """[(name, role, kind)] in canonical order; role input|forward|backward|train, kind is the
    TOLERANCES kind a port's value is checked with (None for inputs, which a port only reads).
    The optional layers (norm "batchnorm"/"layernorm", dropout, embedding) add their tensors;
    without them the order is the one of schema_version 1's first cases, unchanged.  blocks: the
    spec's normalized blocks object (block_tensor_order); steps: the keyword arguments of
    step_tensor_order (the per-step records after train.losses)."""
    hidden = range(n_layers - 1)
    batchnorm = norm == "batchnorm"
    stats = ("running_mean", "running_var", "num_batches_tracked")
    rows = [("inputs.x", "input", None), ("inputs.target", "input", None)]
    kinds = ("weight", "bias") if bias else ("weight",)
    params = [f"layers.{i}.{k}" for i in range(n_layers) for k in kinds]
    if norm:
        params += [f"norms.{i}.{k}" for i in hidden for k in ("weight", "bias")]
    if embedding:
        params.append("embed.weight")
    if blocks:
        params += block_param_names(blocks["n"], blocks["norm"])
    rows += [(f"init.{p}", "input", None) for p in params]
    if batchnorm:
        rows += [(f"init.norms.{i}.{b}", "input", None) for i in hidden for b in stats]
    if dropout:  # the 0/1 masks: of the single forward, then of every training step (rows stacked)
        rows += [(f"inputs.masks.layers.{i}", "input", None) for i in hidden]
        rows += [(f"train.masks.layers.{i}", "input", None) for i in hidden]
    if minibatch:
        rows += [("train.batch_sizes", "input", None), ("train.batch_indices", "input", None)]
    if embedding:
        rows.append(("forward.embed.output", "forward", "forward"))
    for i in range(n_layers):
        if blocks and i == n_layers - 1:
            rows += block_tensor_order(blocks, "forward")
        if norm and i < n_layers - 1:
            rows += [(f"forward.layers.{i}.linear", "forward", "forward"),
                     (f"forward.norms.{i}.mean", "forward", "forward"),
                     (f"forward.norms.{i}.invstd", "forward", "forward")]
            if batchnorm:
                rows += [(f"forward.norms.{i}.{b}", "forward", "curve") for b in stats]
        rows.append((f"forward.layers.{i}.pre_activation", "forward", "forward"))
        if i < n_layers - 1:
            rows.append((f"forward.layers.{i}.activation", "forward", "forward"))
            if dropout:
                rows.append((f"forward.layers.{i}.dropout", "forward", "forward"))
    rows += [("forward.output", "forward", "forward"), ("forward.loss", "forward", "forward"),
             ("backward.grad_output", "backward", "grad")]
    for i in reversed(range(n_layers)):
        if i < n_layers - 1:
            if dropout:
                rows.append((f"backward.layers.{i}.grad_dropout", "backward", "grad"))
            rows.append((f"backward.layers.{i}.grad_activation", "backward", "grad"))
        rows.append((f"backward.layers.{i}.grad_pre_activation", "backward", "grad"))
        if norm and i < n_layers - 1:
            rows += [(f"grads.norms.{i}.weight", "backward", "grad"),
                     (f"grads.norms.{i}.bias", "backward", "grad"),
                     (f"backward.layers.{i}.grad_linear", "backward", "grad")]
        rows += [(f"grads.layers.{i}.{k}", "backward", "grad") for k in kinds]
        if blocks and i == n_layers - 1:
            rows += block_tensor_order(blocks, "backward")
    rows.append(("backward.grad_input", "backward", "grad"))
    if embedding:
        rows.append(("grads.embed.weight", "backward", "grad"))
    rows.append(("train.losses", "train", "curve"))
    rows += step_tensor_order(params, **(steps or {}))
    if batchnorm:  # (steps, H): the running statistics after each training step
        rows += [(f"train.norms.{i}.{b}", "train", "curve") for i in hidden for b in stats[:2]]
    rows += [(f"final.{p}", "train", "curve") for p in params]
    if batchnorm:
        rows += [(f"final.norms.{i}.{b}", "train", "curve") for i in hidden for b in stats]
    return rows


def block_tensor_order(blocks, stage):
    """The residual FFN blocks' rows (manual/blocks.py), between the last hidden layer and the
    head.  forward: per block its LN output (with norm "layer"), fc1's z, the activation, fc2's
    branch v and the block's output h + v; then blocks.output (the head's input, the last
    block's output again).  backward (after the head's gradients), last block first: the
    gradient arriving at its output, at the activation, at z, at LN's output, the branch's at h,
    then its parameters' gradients (fc2, fc1, norm); then blocks.grad_input (dout + the branch's
    gradient, summed once: the residual)."""
    layer_norm = blocks["norm"] == "layer"
    if stage == "forward":
        parts = (("norm",) if layer_norm else ()) + ("pre_activation", "activation", "branch",
                                                      "output")
        rows = [(f"forward.blocks.{b}.{p}", "forward", "forward")
                for b in range(blocks["n"]) for p in parts]
        return rows + [("forward.blocks.output", "forward", "forward")]
    parts = ("grad_output", "grad_activation", "grad_pre_activation") \
        + (("grad_norm",) if layer_norm else ()) + ("grad_branch",)
    layers = ("fc2", "fc1") + (("norm",) if layer_norm else ())
    rows = []
    for b in reversed(range(blocks["n"])):
        rows += [(f"backward.blocks.{b}.{p}", "backward", "grad") for p in parts]
        rows += [(f"grads.blocks.{b}.{layer}.{k}", "backward", "grad") for layer in layers
                 for k in ("weight", "bias")]
    return rows + [("backward.blocks.grad_input", "backward", "grad")]


def step_tensor_order(params, *, schedule=False, clip=False, step_grads=False, scaler=False):
    """The per-step records of the training run, after train.losses: [(name, role, kind)].
    Each is stacked over the steps (first axis = step)."""
    rows = [("train.lr", "train", "curve")] if schedule else []
    if step_grads:   # the step's summed micro-batch gradients, before clipping (steps, *shape)
        rows += [(f"train.grads.{p}", "train", "curve") for p in params]
    if clip:
        rows += [("train.clip.total_norm", "train", "curve"), ("train.clip.coef", "train", "curve")]
    if scaler:
        rows += [("train.scaler.scale", "train", "curve"), ("train.scaler.found_inf", "train", "curve"),
                 ("train.skipped", "train", "curve")]
    return rows


def autocast_tensor_order(n_layers, bias=True, minibatch=False, **steps):
    """[(name, role, kind)] of an autocast case (manual/autocast.py): the L copies each GEMM reads
    (casts.*), every value in the dtype it has there, the float32 loss and gradients; steps: the
    keyword arguments of step_tensor_order (scaler adds final.scaler.*)."""
    kinds = ("weight", "bias") if bias else ("weight",)
    params = [f"layers.{i}.{k}" for i in range(n_layers) for k in kinds]
    rows = [("inputs.x", "input", None), ("inputs.target", "input", None)]
    rows += [(f"init.{p}", "input", None) for p in params]
    if minibatch:
        rows += [("train.batch_sizes", "input", None), ("train.batch_indices", "input", None)]
    for i in range(n_layers):
        if i == 0:
            rows.append(("forward.casts.layers.0.input", "forward", "forward"))
        rows += [(f"forward.casts.layers.{i}.{k}", "forward", "forward") for k in kinds]
        rows.append((f"forward.layers.{i}.pre_activation", "forward", "forward"))
        if i < n_layers - 1:
            rows.append((f"forward.layers.{i}.activation", "forward", "forward"))
    rows += [("forward.output", "forward", "forward"), ("forward.loss", "forward", "forward"),
             ("backward.grad_output", "backward", "grad"),
             ("backward.grad_output_low", "backward", "grad")]
    for i in reversed(range(n_layers)):
        if i < n_layers - 1:
            rows.append((f"backward.layers.{i}.grad_activation", "backward", "grad"))
        rows.append((f"backward.layers.{i}.grad_pre_activation", "backward", "grad"))
        rows += [(f"backward.casts.layers.{i}.grad_{k}", "backward", "grad") for k in kinds]
        rows += [(f"grads.layers.{i}.{k}", "backward", "grad") for k in kinds]
    rows += [("backward.casts.layers.0.grad_input", "backward", "grad"),
             ("backward.grad_input", "backward", "grad"), ("train.losses", "train", "curve")]
    rows += step_tensor_order(params, **steps)
    rows += [(f"final.{p}", "train", "curve") for p in params]
    if steps.get("scaler"):
        rows += [("final.scaler.scale", "train", "curve"),
                 ("final.scaler.growth_tracker", "train", "curve")]
    return rows


def case_for_spec(spec, params=None, data=None, note=""):
    """A case to export: {"spec", "params" (or None: seeded init), "data" (x, target) or None}.
    Refused by name: autocast together with dropout, an embedding or a norm layer (the fixture
    does not carry their low-precision masks, lookup or mixed-kernel norms yet)."""
    if spec.autocast is not None:
        other = ("dropout" if spec.dropout else "an embedding" if spec.embedding is not None
                 else f"norm {spec.norm}" if spec.norm is not None else None)
        if other is not None:
            raise ValueError(f"autocast: export does not carry autocast with {other} yet; "
                             f"remove one of them")
    return {"spec": spec, "params": params, "data": data, "note": note}


def _record_training(mlp, n_hidden):
    """Wrap mlp.forward so that each training step's dropout masks (0/1, in order) and running
    statistics (after the step's forward) are kept -> the lists they are appended to."""
    masks, stats = {i: [] for i in range(n_hidden)}, []
    forward = mlp.forward

    def recording_forward(x, target, trace=None):
        loss, cache = forward(x, target, trace)
        for i in range(n_hidden):
            noise = cache.layers[i].dropout           # the scaled mask mask/(1 − p), or None
            if noise is not None:
                masks[i].append((noise != 0).to(noise.dtype))
        stats.append({n: b.clone() for n, b in mlp.buffers.items()})
        return loss, cache
    mlp.forward = recording_forward
    return masks, stats


def run_case(case):
    """Run the manual MLP on a case (CPU) -> (spec, ordered {name: tensor}, order, reference tiers
    vs autograd).

    The values are the manual MLP's (under autocast: manual.autocast.AutocastMLP's); the same run
    is repeated on the autograd twin and the tier of each tensor autograd exposes is recorded
    (bitwise on CPU for every shipped example).  The single forward/backward and the training run
    each start from `init.*` (and the initial running statistics), on a fresh pair: the dropout
    masks each draws are recorded as inputs.
    """
    spec = Spec.from_dict({**case["spec"].to_dict(), "device": "cpu"})
    x, target = _case_data(case, spec)
    pair = build_pair(spec, case["params"])
    init = {name: p.clone() for name, p in pair.mlp.params.items()}
    values = {"inputs.x": x, "inputs.target": target}
    values.update({f"init.{n}": p for n, p in init.items()})
    values.update({f"init.{n}": b.clone() for n, b in pair.mlp.buffers.items()})
    # accumulate k: step s takes the next k batches of the seeded schedule (harness.lockstep_batches)
    index_list = datasets.batches(x.shape[0], spec.batch_size, spec.steps * spec.accumulate,
                                  spec.seed)
    minibatch = index_list[0] is not None
    if minibatch:
        # batch b uses rows batch_indices[sum(batch_sizes[:b]) : sum(batch_sizes[:b+1])]
        values["train.batch_sizes"] = torch.tensor([len(i) for i in index_list], dtype=torch.int64)
        values["train.batch_indices"] = torch.cat([i.to(torch.int64) for i in index_list])
    single = _autocast_pass if spec.autocast is not None else _plain_pass
    reference = single(pair, x, target, values)
    reference.update(_training(build_pair(spec, init), x, target, values))
    steps = {"schedule": spec.lr_schedule is not None, "clip": spec.clip_grad_norm is not None,
             "step_grads": _keeps_step_grads(spec), "scaler": spec.scaler_settings is not None}
    if spec.autocast is not None:
        order = autocast_tensor_order(pair.mlp.n_layers, spec.bias, minibatch, **steps)
    else:
        order = tensor_order(pair.mlp.n_layers, spec.bias, minibatch, norm=spec.norm,
                             dropout=bool(spec.dropout), embedding=spec.embedding is not None,
                             blocks=spec.blocks, steps=steps)
    missing = [n for n, _, _ in order if n not in values]
    if missing or len(values) != len(order):
        raise RuntimeError(f"export: traced names {sorted(values)} do not match the canonical "
                           f"order (missing {missing})")
    return spec, {n: values[n].detach().cpu().contiguous() for n, _, _ in order}, order, reference


def _case_data(case, spec):
    """The case's (x, target) on the CPU: x in the spec's dtype (token indices stay int64),
    a float target too, class labels int64."""
    x, target = case["data"] if case["data"] is not None else datasets.load_data(spec)
    x = x.detach().to(device="cpu")
    if spec.embedding is None or x.is_floating_point():
        x = x.to(dtype=spec.torch_dtype)
    target = target.detach().cpu()
    if target.is_floating_point():
        target = target.to(spec.torch_dtype)
    return x, target


def _keeps_step_grads(spec):
    """Whether the fixture records each step's summed gradients (clipping or accumulation)."""
    return spec.clip_grad_norm is not None or spec.accumulate > 1


def _add_trace(values, trace):
    for name, t in trace.items():
        stage = "backward" if name.startswith("grad") or ".grad_" in name else "forward"
        values[f"{stage}.{name}"] = t


def _reference_tiers(verdicts):
    """gradient_checks' verdicts -> {fixture tensor name: tier}."""
    return {{"loss": "forward.loss", "output": "forward.output",
             "input.grad": "backward.grad_input"}.get(v.name, f"grads.{v.name[:-5]}"): v.tier
            for v in verdicts}


def _fresh_pair(pair, values):
    """A new pair from the case's init.* parameters (the reference run of the twin)."""
    return build_pair(pair.spec, {n: values[f"init.{n}"] for n in pair.mlp.params})


def _plain_pass(pair, x, target, values):
    """The single forward/backward of the manual MLP into values (the loss is traced as
    forward.loss; the running statistics after it as forward.norms.*) -> reference tiers."""
    trace = {}
    _, cache = pair.mlp.forward(x, target, trace=trace)
    grads, dx = pair.mlp.backward(cache, trace=trace)
    values.update({f"forward.{n}": b.clone() for n, b in pair.mlp.buffers.items()})
    for i in range(pair.mlp.n_layers - 1):
        noise = cache.layers[i].dropout
        if noise is not None:
            values[f"inputs.masks.layers.{i}"] = (noise != 0).to(noise.dtype)
    _add_trace(values, trace)
    values.update({f"grads.{n}": g for n, g in grads.items()})
    values["backward.grad_input"] = dx
    return _reference_tiers(gradient_checks(_fresh_pair(pair, values), x, target))


def _autocast_pass(pair, x, target, values):
    """One forward/backward under autocast (dloss = 1, unscaled), every cast and low-precision
    value traced -> reference tiers (the float32 loss and gradients vs torch.autocast)."""
    trace = {}
    _, cache = pair.amp.forward(x, target, trace)
    grads = pair.amp.backward(cache, trace=trace)
    _add_trace(values, trace)
    values.update({f"grads.{n}": g for n, g in grads.items()})
    return _reference_tiers(gradient_checks(_fresh_pair(pair, values), x, target))


def _record_found_inf(scaler):
    """Wrap scaler.unscale_ so that each step's found_inf is kept -> the list it is appended to."""
    found = []
    if scaler is not None:
        unscale = scaler.unscale_

        def recording_unscale(grads):
            found.append(unscale(grads))
            return found[-1]
        scaler.unscale_ = recording_unscale
    return found


def _training(pair, x, target, values):
    """The short training run (harness.curve_checks, lockstep with the twin) into values: the
    losses, the per-step records (step_tensor_order), the final parameters, buffers, running
    statistics and dropout masks -> reference tiers."""
    spec, n_hidden = pair.spec, pair.mlp.n_layers - 1
    masks, stats = _record_training(pair.mlp, n_hidden)
    found, outs = _record_found_inf(pair.scaler), []
    verdicts, (losses, _) = curve_checks(pair, x, target, spec.steps, spec.batch_size, spec.seed,
                                         record=outs, keep_grads=_keeps_step_grads(spec))
    names = {"loss_curve": "train.losses", "lr_curve": "train.lr", "scale_curve":
             "train.scaler.scale", "clip_norm_curve": "train.clip.total_norm",
             "skipped_steps": "train.skipped"}
    reference = {names.get(v.name, v.name): v.tier for v in verdicts}
    values["train.losses"] = losses
    values.update(_step_records(outs, found, reference))
    values.update({f"final.{n}": p for n, p in pair.mlp.params.items()})
    if pair.scaler is not None:
        values["final.scaler.scale"] = pair.scaler.scale.clone()
        values["final.scaler.growth_tracker"] = torch.tensor(pair.scaler.growth_tracker)
    twin_buffers = dict(pair.twin.named_buffers())
    for n, b in pair.mlp.buffers.items():
        values[f"final.{n}"] = b
        reference[f"final.{n}"] = compare_tensors(n, b, twin_buffers[n], "curve").tier
        if not n.endswith("num_batches_tracked"):
            values[f"train.{n}"] = torch.stack([s[n] for s in stats])
    for i, per_step in masks.items():
        if per_step:
            values[f"train.masks.layers.{i}"] = torch.cat(per_step)
    return reference


def _step_records(outs, found, reference):
    """The StepOuts of a training run -> {name: tensor stacked over the steps}: the learning rate
    (float64, the Python float the optimizer used), the summed gradients before clipping, the
    clip total norm and coefficient, the loss scale (float32), found_inf and skipped (bool)."""
    first, rec = outs[0], {}
    if first.lr_m is not None:
        rec["train.lr"] = torch.tensor([o.lr_m for o in outs], dtype=torch.float64)
    for name in first.grads_m or {}:
        rec[f"train.grads.{name}"] = torch.stack([o.grads_m[name] for o in outs])
        reference[f"train.grads.{name}"] = compare_tensors(
            name, rec[f"train.grads.{name}"], torch.stack([o.grads_t[name] for o in outs]),
            "curve").tier
    if first.norm_m is not None:
        rec["train.clip.total_norm"] = torch.stack([o.norm_m for o in outs])
        rec["train.clip.coef"] = torch.stack([o.coef for o in outs])
    if first.scale_m is not None:
        rec["train.scaler.scale"] = torch.tensor([o.scale_m for o in outs], dtype=torch.float32)
        rec["train.scaler.found_inf"] = torch.tensor(found, dtype=torch.bool)
        rec["train.skipped"] = torch.tensor([not o.stepped_m for o in outs], dtype=torch.bool)
    return rec


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
            blob = encode_safetensors(values, {"case": case_name, "schema_version": SCHEMA_VERSION})
            with open(path, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            tensors = []
            for name, role, kind in order:
                t = values[name]
                entry = {"name": name, "role": role, "dtype": ST_DTYPES[t.dtype],
                         "shape": list(t.shape), "kind": kind}
                if kind is not None:
                    rtol, atol, ulp_limit = _tolerance(spec, t, kind)
                    entry.update(rtol=rtol, atol=max(atol, rtol * _scale(t)),
                                 ulp_limit=ulp_limit, required_tier="tolerance")
                if name in reference:
                    entry["autograd_tier"] = reference[name]
                tensors.append(entry)
            manifest["cases"].append({
                "name": case_name, "dtype": spec.dtype, "file": fname,
                "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
                "steps": spec.steps, "note": case.get("note", ""), "spec": spec.to_dict(),
                "tensors": tensors})
        _write_json(os.path.join(tmp, MANIFEST), manifest)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _tolerance(spec, t, kind):
    """(rtol, atol, ulp_limit) of a tensor: ulps counted in its own format (a BF16/F16 tensor in
    bfloat16/float16 ulps, a float64 learning rate in a float32 case in float64's; integers and
    bool compare exactly), rtol/atol of the precision it was computed in: its own dtype, except
    the float32 values of an autocast case (loss, gradients, parameters), which carry only the
    low dtype's precision: one L rounding that a port's GEMM order moves by an ulp of L reaches
    them at that relative size, and a training run carries it on."""
    graded = t.dtype if t.dtype in TOLERANCES else spec.torch_dtype
    computed = spec.autocast_dtype if spec.autocast is not None and graded == torch.float32 \
        else graded
    return (*TOLERANCES[computed][kind], ULP_LIMIT[graded])


def _scale(t):
    """The tensor's largest finite magnitude.  A port's GEMM and reductions sum in another order,
    and an element that is small because its terms cancelled carries an error on the scale of the
    terms, not of itself; so atol is rtol·(largest magnitude), never less than the table's atol."""
    if t.dtype == torch.bool:
        return 0.0
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
