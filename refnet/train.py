"""Train the manual MLP and its autograd twin in lockstep, checking as it goes that they agree.

Both sides start from the same parameters and see the same mini-batches (refnet.harness).  The
losses of the two sides are compared at every step (on CUDA: gathered on the device and compared
at each check point, so the GPU is synchronized only there) and the parameters every
`check_every` steps.  The first comparison worse than the allowed tier stops the run with a
message naming the step, the tensor, the tier and both values.

Outputs in out_dir: losses.csv, summary.json, checkpoint.pt and, when matplotlib is installed,
loss_curves.png and (2-D classification data) decision_boundary.png.  Every file is written
atomically.  A checkpoint holds both sides' parameters, both optimizers' state, the losses so far
and the step reached; the batch schedule is regenerated from the seed, so on CPU a resumed run's
curve is bitwise identical to an uninterrupted one.
"""
from dataclasses import dataclass
import hashlib
import io
import json
import os
import signal
import sys
import threading
import time

import torch

from refnet import harness
from refnet.atomic import write_atomic
from refnet import twin as twin_mod
from refnet.compare import TIERS, compare_curves, compare_tensors, same_bits
from refnet.report import json_safe
from refnet.settings import determinism, resolve_devices
from refnet import known
from refnet.spec import Spec

ALLOWED_TIERS = ("bitwise", "ulp", "tolerance")
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_MAGIC = b"REFNET-CHECKPOINT"
CHECKPOINT_FORMAT = 1


# -- examples that train: name -> spec (and, where the document fixes them, data and params) --

@dataclass
class TrainExample:
    title: str
    spec: object            # () -> Spec
    data: object = None     # (spec) -> (x, target) on spec's device/dtype; None: harness.load_data
    params: object = None   # (spec) -> dict of initial params; None: the spec's seeded init


def _seed_data(spec):
    from refnet.examples.seed import seed_data
    x, y, _, _ = seed_data(spec.seed)
    return x.to(spec.torch_dtype).to(spec.device), y.to(spec.torch_dtype).to(spec.device)


def _seed_params(spec):
    from refnet.examples.seed import seed_data, seed_params
    _, _, w1, w2 = seed_data(spec.seed)
    return seed_params(w1, w2)


def _seed_spec():
    from refnet.examples.seed import seed_spec
    return seed_spec()


# Sizes and rates chosen so each example learns on its data (xor: 100 % accuracy within 500
# steps; circles and spiral: ≥ 95 %; measured on CPU float64, see tests/test_train.py).
# xor and circles use mse on one-hot targets (labels as 0/1 for one output); spiral uses
# softmax cross-entropy with Adam.
EXAMPLES = {
    "xor": TrainExample("XOR, 2-8-1 tanh, mse on 0/1 targets", lambda: Spec(
        sizes=[2, 8, 1], activation="tanh", loss="mse", data="xor", steps=500,
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, name="xor")),
    "circles": TrainExample("two concentric rings, 2-16-2 tanh, mini-batches of 32", lambda: Spec(
        sizes=[2, 16, 2], activation="tanh", loss="mse", data="circles", n_samples=200,
        batch_size=32, steps=1000, optimizer={"name": "sgd", "lr": 0.2, "momentum": 0.9},
        name="circles")),
    "spiral": TrainExample("CS231n's 3-class spiral, 2-64-64-3 relu, softmax cross-entropy, "
                           "Adam, mini-batches of 64", lambda: Spec(
        sizes=[2, 64, 64, 3], activation="relu", loss="cross_entropy", data="spiral",
        n_samples=300, batch_size=64, steps=1500, optimizer={"name": "adam", "lr": 0.01},
        name="spiral")),
    "two_layer_seed": TrainExample("the document's two-layer numpy program (section 6)",
                                   _seed_spec, data=_seed_data, params=_seed_params),
    "random": TrainExample("random regression, 10-32-5 tanh", lambda: Spec(
        sizes=[10, 32, 5], activation="tanh", loss="mse", data="random", n_samples=64,
        steps=500, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, name="random")),
}


def get_example(name):
    if name not in EXAMPLES:
        raise ValueError(f"--example: unknown name {name!r}; expected one of {', '.join(EXAMPLES)}")
    return EXAMPLES[name]


def with_overrides(spec, **overrides):
    """A copy of spec with steps/lr/batch_size/device/dtype replaced where given (None: keep);
    full_batch=True sets batch_size to None (full batch)."""
    raw = spec.to_dict()
    lr = overrides.pop("lr", None)
    if lr is not None:
        raw["optimizer"] = {**raw["optimizer"], "lr": lr}
    if overrides.pop("full_batch", False):
        if overrides.get("batch_size") is not None:
            raise ValueError("--batch-size: give a size or none, not both")
        raw["batch_size"] = None
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return Spec.from_dict(raw)


def default_tier(spec):
    """The tier a run is held to: refnet.known's expectation for gradients (bitwise on CPU; tolerance
    on CUDA or when the spec uses a known non-bitwise op, whose 1-ulp differences compound)."""
    return known.expected_tier(spec, spec.device, "grad")


# -- atomic files and checkpoints --

RUN_FILES = (CHECKPOINT_NAME, "losses.csv", "summary.json")


def existing_run_files(out_dir):
    """The files of an earlier run already in out_dir (checkpoint.pt, losses.csv, summary.json)."""
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]


def save_checkpoint(path, payload):
    """A header line `REFNET-CHECKPOINT <format> <sha256 of the body>` then torch.save's bytes."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = b"%s %d %s\n" % (CHECKPOINT_MAGIC, CHECKPOINT_FORMAT,
                              hashlib.sha256(body).hexdigest().encode())
    write_atomic(path, lambda f: (f.write(header), f.write(body)))


_CHECKPOINT_KEYS = ("step", "spec", "example", "manual_params", "twin_params", "manual_optimizer",
                    "twin_optimizer", "losses_manual", "losses_twin")


def load_checkpoint(path, map_location="cpu"):
    """Read and verify a checkpoint; ValueError (one line) if it is missing, foreign or corrupt."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"--resume: no checkpoint at {path}")
    with open(path, "rb") as f:
        raw = f.read()
    head, sep, body = raw.partition(b"\n")
    fields = head.split(b" ")
    if not sep or len(fields) != 3 or fields[0] != CHECKPOINT_MAGIC:
        raise ValueError(f"--resume: {path} is not a refnet checkpoint (bad header)")
    if fields[1] != str(CHECKPOINT_FORMAT).encode():
        raise ValueError(f"--resume: {path} has checkpoint format {fields[1].decode(errors='replace')}; "
                         f"this refnet reads format {CHECKPOINT_FORMAT}")
    if hashlib.sha256(body).hexdigest().encode() != fields[2]:
        raise ValueError(f"--resume: {path} is corrupt or truncated (sha256 of its contents does "
                         f"not match the one recorded in it); refusing to resume from it")
    try:
        payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as exc:  # a checksum-valid file torch cannot read: a foreign writer
        raise ValueError(f"--resume: {path} cannot be loaded ({exc.__class__.__name__})") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ValueError(f"--resume: {path} lacks {missing}; not a refnet training checkpoint")
    return payload


def _cpu(obj):
    """Detached CPU copies of every tensor in nested dicts/lists (what a checkpoint stores)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _check_resume_spec(spec, saved):
    """Only steps (to extend a run) and device may differ from the checkpoint's spec."""
    now = spec.to_dict()
    for key, value in saved.items():
        if key in ("steps", "device"):
            continue
        if now.get(key) != value:
            raise ValueError(f"--resume: {key} is {now.get(key)!r} but the checkpoint was trained "
                             f"with {value!r}; a resumed run must keep it")


# -- the run --

class _Stop(Exception):
    def __init__(self, status, message=""):
        super().__init__(message)
        self.status, self.message = status, message


def _labels(target):
    """Class labels of a classification target: int labels, 0/1 column, or one-hot rows; else None."""
    if target.dtype == torch.int64:
        return target
    binary = bool(((target == 0) | (target == 1)).all())
    if not binary or target.dim() != 2:
        return None
    if target.shape[1] == 1:
        return target[:, 0].to(torch.int64)
    return target.argmax(1) if bool((target.sum(1) == 1).all()) else None


def predict_class(output):
    """(N, C) outputs -> (N,) classes: argmax, or output > 0.5 for a single output."""
    return (output[:, 0] > 0.5).to(torch.int64) if output.shape[1] == 1 else output.argmax(1)


def train(spec, out_dir=None, *, check_every=50, tier=None, resume=None, progress=None,
          example=None, data=None, params=None, on_step=None):
    """Train spec's MLP and its twin in lockstep; return the summary (also summary.json).

    out_dir: where to write the outputs and checkpoints (None: nothing written).
    check_every: compare the parameters (and write a checkpoint) every this many steps.
    tier: the worst agreement allowed (bitwise | ulp | tolerance); default: default_tier(spec).
    resume: a checkpoint file or a folder holding checkpoint.pt; the run continues from its step
        up to spec.steps.  spec may be None (the checkpoint's spec) or must match it except for
        steps and device.
    progress: True / False / None (a tqdm bar when tqdm is installed and stderr is a terminal).
    example: a name of EXAMPLES, whose data/params replace the spec's when given.
    data: (x, target) to train on; params: initial parameters (nn.Linear layout).
    on_step(step, loss_manual, loss_twin): called after every step (tests use it to interrupt).

    summary["status"]: completed | diverged (summary["divergence"] says where) | interrupted;
    "completed (non-finite from step K)" when the losses became NaN/inf at step K on both sides
    alike (summary["nonfinite"] says so in words; first_nonfinite_step is K).
    """
    if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 1:
        raise ValueError(f"--check-every: expected an integer >= 1, got {check_every!r}")
    checkpoint = None
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        saved = dict(checkpoint["spec"])
        spec = spec or Spec.from_dict(saved)
        _check_resume_spec(spec, saved)
        example = example or checkpoint["example"]
        if checkpoint["step"] >= spec.steps:
            raise ValueError(f"--steps: the checkpoint is already at step {checkpoint['step']}; "
                             f"give --steps larger than that to continue")
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a refnet Spec, got {type(spec).__name__}")
    if spec.device == "cuda":
        resolve_devices("cuda")  # a clear error without a GPU
    tier = tier or default_tier(spec)
    if tier not in ALLOWED_TIERS:
        raise ValueError(f"--tier: expected one of {', '.join(ALLOWED_TIERS)}, got {tier!r}")
    if example is not None:
        ex = get_example(example)
        data = data if data is not None or ex.data is None else ex.data(spec)
        params = params if params is not None or ex.params is None else ex.params(spec)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    with determinism(spec.device):
        return _run(spec, out_dir, check_every, tier, checkpoint, progress, example, data, params,
                    on_step)


def _run(spec, out_dir, check_every, tier, checkpoint, progress, example, data, params, on_step):
    started = time.time()
    device, cuda = spec.device, spec.device == "cuda"
    x, target = data if data is not None else harness.load_data(spec)
    pair = harness.build_pair(spec, params)
    start, hist_m, hist_t = 0, [], []
    if checkpoint is not None:
        _restore(pair, checkpoint, device)
        start = int(checkpoint["step"])
        hist_m = [checkpoint["losses_manual"].to(device)]
        hist_t = [checkpoint["losses_twin"].to(device)]
    state = {"worst": "bitwise", "checks": 0, "interrupted": False, "last_checkpoint": None}
    if checkpoint is not None:
        state["worst"] = checkpoint.get("worst_tier", "bitwise")
    pending_m, pending_t = [], []
    bar = _progress_bar(progress, spec, start)
    restore_sigint = _install_sigint(state)

    def grade(verdict):
        state["checks"] += 1
        state["worst"] = max(state["worst"], verdict.tier, key=TIERS.index)

    def flush_losses():
        if not pending_m:
            return
        window_m, window_t = torch.stack(pending_m), torch.stack(pending_t)
        hist_m.append(window_m)
        hist_t.append(window_t)
        pending_m.clear()
        pending_t.clear()
        verdict = compare_curves("loss", window_m, window_t, required=tier)
        grade(verdict)
        if not verdict.passed:
            first = sum(t.numel() for t in hist_m) - window_m.numel()
            for i in range(window_m.numel()):  # the first step beyond the tier
                v = compare_tensors("loss", window_m[i], window_t[i], "curve", required=tier)
                if not v.passed:
                    raise _Stop("diverged", _divergence(first + i, "loss", v, tier, spec))

    def check_params(step):
        twin_params = twin_mod.params_of(pair.twin)
        for name, p in pair.mlp.params.items():
            v = compare_tensors(name, p, twin_params[name], "curve", required=tier)
            grade(v)
            if not v.passed:
                raise _Stop("diverged", _divergence(step, name, v, tier, spec))

    def after_step(step, loss_m, loss_t):
        pending_m.append(loss_m)
        pending_t.append(loss_t)
        if on_step is not None:
            on_step(step, loss_m, loss_t)
        done = step + 1
        at_check = done % check_every == 0 or done == spec.steps
        if not cuda or at_check:
            flush_losses()
        if at_check:
            check_params(done - 1)
            if out_dir is not None:
                _save(out_dir, pair, spec, example, done, hist_m, hist_t, state)
            if bar is not None:
                bar.set_postfix(loss=f"{float(loss_m):.4g}", tier=state["worst"], refresh=False)
        if bar is not None:
            bar.update(1)
        if state["interrupted"] and done < spec.steps:
            raise _Stop("interrupted", f"interrupted at step {done}")

    status, message = "completed", ""
    try:
        harness.train_lockstep(pair, x, target, spec.steps - start, spec.batch_size, spec.seed,
                               on_step=after_step, start=start)
    except _Stop as stop:
        status, message = stop.status, stop.message
        if status == "interrupted":
            flush_losses()
            if out_dir is not None:
                done = sum(t.numel() for t in hist_m)
                _save(out_dir, pair, spec, example, done, hist_m, hist_t, state)
                message += f"; resume with --resume {out_dir}"
    finally:
        if bar is not None:
            bar.close()
        for old in restore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_DFL if old is None else old)
    losses_m = torch.cat(hist_m).cpu() if hist_m else torch.zeros(0)
    losses_t = torch.cat(hist_t).cpu() if hist_t else torch.zeros(0)
    summary = _summary(spec, example, tier, state, status, message, start, losses_m, losses_t,
                       pair, x, target, time.time() - started)
    if out_dir is not None:
        summary["files"] = _write_outputs(out_dir, spec, summary, losses_m, losses_t, pair, x,
                                          target)
    return summary


def _divergence(step, tensor, verdict, tier, spec):
    where = f"worst at {verdict.worst_index}: " if verdict.worst_index else ""
    values = verdict.worst_values or [None, None]
    return (f"step {step}: {tensor} diverged beyond the {tier} tier on {spec.device}/{spec.dtype} "
            f"(got {verdict.tier}): {where}manual {values[0]!r} vs twin {values[1]!r}, "
            f"{verdict.mismatched}/{verdict.numel} elements differ, max ulp {verdict.max_ulp:.6g}, "
            f"max abs diff {verdict.max_abs_diff:.3g}")


def _restore(pair, ck, device):
    """Both sides' parameters and both optimizers' state from a checkpoint."""
    names = set(pair.mlp.params)
    for side in ("manual_params", "twin_params"):
        if set(ck[side]) != names:
            raise ValueError(f"--resume: checkpoint {side} are {sorted(ck[side])}, the spec's "
                             f"model has {sorted(names)}")
    for name, p in pair.mlp.params.items():
        p.copy_(ck["manual_params"][name])
    twin_mod.load_params(pair.twin, ck["twin_params"])
    pair.mlp.optimizer.load_state_dict(_to(ck["manual_optimizer"], device))
    pair.twin_opt.load_state_dict(ck["twin_optimizer"])
    # batch norm's running statistics and the dropout streams (absent in older checkpoints,
    # whose specs have neither)
    buffers = ck.get("manual_buffers", {})
    if set(buffers) != set(pair.mlp.buffers):
        raise ValueError(f"--resume: checkpoint buffers are {sorted(buffers)}, the spec's model "
                         f"has {sorted(pair.mlp.buffers)}")
    for name, b in pair.mlp.buffers.items():
        b.copy_(buffers[name])
    twin_mod.load_buffers(pair.twin, ck.get("twin_buffers", {}))
    if ck.get("manual_rng") is not None and pair.mlp.generator is not None:
        pair.mlp.generator.set_state(ck["manual_rng"])
    if ck.get("twin_rng") is not None and hasattr(pair.twin, "_rng_state"):
        pair.twin._rng_state = ck["twin_rng"].clone()


def _save(out_dir, pair, spec, example, step, hist_m, hist_t, state):
    payload = {
        "format": CHECKPOINT_FORMAT, "step": step, "spec": spec.to_dict(), "example": example,
        "manual_params": _cpu(pair.mlp.params), "twin_params": _cpu(twin_mod.params_of(pair.twin)),
        "manual_buffers": _cpu(pair.mlp.buffers),
        "twin_buffers": _cpu(twin_mod.buffers_of(pair.twin)),
        "manual_rng": pair.mlp.generator.get_state() if pair.mlp.generator is not None else None,
        "twin_rng": getattr(pair.twin, "_rng_state", None),
        "manual_optimizer": _cpu(pair.mlp.optimizer.state_dict()),
        "twin_optimizer": _cpu(pair.twin_opt.state_dict()),
        "losses_manual": torch.cat(hist_m).cpu(), "losses_twin": torch.cat(hist_t).cpu(),
        "worst_tier": state["worst"], "torch": str(torch.__version__),
    }
    save_checkpoint(os.path.join(out_dir, CHECKPOINT_NAME), payload)
    state["last_checkpoint"] = step


def _progress_bar(progress, spec, start):
    if progress is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    if progress is None and not (sys.stderr.isatty() and sys.stdout.isatty()):
        return None
    return tqdm(total=spec.steps, initial=start, desc=spec.name, unit="step", file=sys.stderr,
                leave=True)


def _install_sigint(state):
    """Ctrl-C stops at the next step boundary (a consistent state to checkpoint); a second one
    interrupts at once.  Only possible in the main thread; returns [the handler to restore]
    (signal.signal may return None for a handler not set from Python)."""
    if threading.current_thread() is not threading.main_thread():
        return []

    def handler(signum, frame):
        if state["interrupted"]:
            raise KeyboardInterrupt
        state["interrupted"] = True

    return [signal.signal(signal.SIGINT, handler)]


def _accuracy(output, labels):
    return float((predict_class(output).cpu() == labels.cpu()).double().mean())


def _summary(spec, example, tier, state, status, message, start, losses_m, losses_t, pair, x,
             target, seconds):
    n = losses_m.numel()
    summary = {
        "name": spec.name, "example": example, "status": status, "divergence": None,
        "message": message, "device": spec.device, "dtype": spec.dtype, "steps": n,
        "steps_planned": spec.steps, "resumed_from": start if start else None,
        "allowed_tier": tier, "tier": state["worst"], "comparisons": state["checks"],
        "last_checkpoint": state["last_checkpoint"],
        "final_loss_manual": float(losses_m[-1]) if n else None,
        "final_loss_twin": float(losses_t[-1]) if n else None,
        "identical_steps": int(same_bits(losses_m, losses_t).sum()) if n else 0,
        "max_abs_loss_diff": float((losses_m.double() - losses_t.double()).abs().max()) if n else 0.0,
        "spec": spec.to_dict(), "seconds": round(seconds, 3), "torch": str(torch.__version__),
    }
    if status == "diverged":
        summary["divergence"] = message
    # NaN/inf on both sides at the same step is agreement, not divergence, but worth saying.
    k_m, k_t = _first_nonfinite(losses_m), _first_nonfinite(losses_t)
    summary["first_nonfinite_step"] = k_m if k_t is None else k_t if k_m is None else min(k_m, k_t)
    summary["first_nonfinite_step_manual"], summary["first_nonfinite_step_twin"] = k_m, k_t
    summary["nonfinite"] = _nonfinite_note(k_m, k_t, losses_m, losses_t)
    if summary["nonfinite"] and status == "completed":
        summary["status"] = f"completed (non-finite from step {summary['first_nonfinite_step']})"
    labels = _labels(target)
    if labels is not None:  # in eval mode: running statistics, no dropout
        pair.mlp.eval()
        pair.twin.eval()
        with torch.no_grad():
            summary["accuracy_manual"] = _accuracy(pair.mlp.predict(x)[0], labels)
            summary["accuracy_twin"] = _accuracy(pair.twin(x), labels)
        pair.mlp.train()
        pair.twin.train()
    return summary


def _first_nonfinite(losses):
    bad = (~torch.isfinite(losses)).nonzero()
    return int(bad[0, 0]) if bad.numel() else None


def _nonfinite_note(k_m, k_t, losses_m, losses_t):
    """One line on where the losses stopped being finite (None when they never did)."""
    if k_m is None and k_t is None:
        return None
    if k_m == k_t:
        same = bool((torch.isfinite(losses_m) == torch.isfinite(losses_t)).all())
        return (f"losses non-finite (NaN/inf) from step {k_m} on both sides"
                + (", identically: a faithful reproduction of a diverging run" if same else
                   "; later steps are non-finite on one side only"))
    where = lambda k: f"from step {k}" if k is not None else "never"  # noqa: E731
    return f"losses non-finite (NaN/inf): manual {where(k_m)}, twin {where(k_t)}"


# -- outputs --

def _write_outputs(out_dir, spec, summary, losses_m, losses_t, pair, x, target):
    files = ["losses.csv", "summary.json"]
    lines = ["step,manual_loss,twin_loss,abs_diff"]
    for step, (a, b) in enumerate(zip(losses_m.tolist(), losses_t.tolist())):
        lines.append(f"{step},{a!r},{b!r},{abs(a - b)!r}")  # repr: the exact float, round-trips
    text = "\n".join(lines) + "\n"
    write_atomic(os.path.join(out_dir, "losses.csv"), lambda f: f.write(text.encode()))
    if summary["last_checkpoint"] is not None:
        files.append(CHECKPOINT_NAME)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        matplotlib = None
    if matplotlib is not None and losses_m.numel():
        _plot_losses(os.path.join(out_dir, "loss_curves.png"), spec, losses_m, losses_t, summary)
        files.append("loss_curves.png")
        labels = _labels(target)
        if labels is not None and x.shape[1] == 2:  # 2-D classification data
            _plot_boundary(os.path.join(out_dir, "decision_boundary.png"), spec, pair, x, labels,
                           summary)
            files.append("decision_boundary.png")
    summary["files"] = files
    blob = json.dumps(json_safe(summary), indent=2, allow_nan=False, default=str) + "\n"
    write_atomic(os.path.join(out_dir, "summary.json"), lambda f: f.write(blob.encode()))
    return files


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global state
    return fig


def _save_png(fig, path):
    write_atomic(path, lambda f: fig.savefig(f, format="png"))


def _plot_losses(path, spec, losses_m, losses_t, summary):
    fig = _figure(8, 6)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    steps = torch.arange(losses_m.numel()).numpy()
    lm, lt = losses_m.double().numpy(), losses_t.double().numpy()
    # |manual − twin| in torch: inf − inf gives NaN there without numpy's RuntimeWarning.
    d = (losses_m.double() - losses_t.double()).abs()
    finite = torch.isfinite(d)
    diff, finite = d.numpy(), finite.numpy()
    top.plot(steps, lm, color="tab:blue", lw=2.5, label="manual")
    top.plot(steps, lt, color="tab:orange", lw=1.2, ls="--", label="autograd twin")
    shown_m, shown_t = lm[finite], lt[finite]
    if shown_m.size and (shown_m > 0).all() and (shown_t > 0).all():
        top.set_yscale("log")
    top.set_ylabel(f"loss ({spec.loss})")
    title = f"{spec.name}: {spec.device}/{spec.dtype}, tier {summary['tier']} "
    k = summary.get("first_nonfinite_step")
    if k is None:
        title += f"({summary['identical_steps']}/{summary['steps']} steps identical"
    else:
        both = (summary.get("first_nonfinite_step_manual")
                == summary.get("first_nonfinite_step_twin"))
        same = same_bits(losses_m, losses_t).numpy()
        title += (f"({int((same & finite).sum())}/{int(finite.sum())} finite steps identical;\n"
                  f"loss non-finite from step {k}" + (" on both sides" if both else "")
                  + ", not drawn beyond it")
        for ax in (top, bottom):
            ax.axvline(k, color="tab:red", lw=1.2, ls=":")
        top.text(k, 0.5, f" non-finite (NaN/inf) from step {k}", color="tab:red", rotation=90,
                 ha="right", va="center", transform=top.get_xaxis_transform())
        top.set_xlim(-0.5, max(len(steps) - 0.5, k + 0.5))
    top.set_title(title + ")")
    top.legend()
    top.grid(alpha=0.3)
    nonzero = finite & (diff > 0)
    if nonzero.any():
        bottom.semilogy(steps[nonzero], diff[nonzero], ".", color="tab:red", ms=3)
    else:
        bottom.set_yscale("log")
        bottom.set_ylim(1e-20, 1e-15)
        where = "every step" if k is None else "every step with finite losses"
        bottom.text(0.5, 0.5, f"|manual − twin| = 0 at {where} (bitwise)", ha="center",
                    va="center", transform=bottom.transAxes)
    bottom.set_ylabel("|manual − twin|")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    _save_png(fig, path)


def _plot_boundary(path, spec, pair, x, labels, summary):
    import numpy as np
    xc, yc = x.detach().double().cpu().numpy(), labels.cpu().numpy()
    lo, hi = xc.min(0), xc.max(0)
    pad = 0.15 * (hi - lo) + 1e-3
    g0, g1 = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], 300),
                         np.linspace(lo[1] - pad[1], hi[1] + pad[1], 300))
    grid = torch.from_numpy(np.stack([g0.ravel(), g1.ravel()], 1)).to(x.dtype).to(x.device)
    with torch.no_grad():  # eval mode: running statistics, no dropout, no stream advanced
        training = pair.mlp.training
        pair.mlp.eval()
        cls = predict_class(pair.mlp.predict(grid)[0]).cpu().numpy().reshape(g0.shape)
        pair.mlp.train(training)
    classes = max(int(yc.max()), int(cls.max())) + 1
    from matplotlib.colors import ListedColormap
    palette = ["tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown",
               "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
    cmap = ListedColormap([palette[c % len(palette)] for c in range(classes)])
    fig = _figure(6, 6)
    ax = fig.subplots()
    ax.contourf(g0, g1, cls, levels=np.arange(classes + 1) - 0.5, cmap=cmap, alpha=0.25)
    ax.scatter(xc[:, 0], xc[:, 1], c=yc, cmap=cmap, vmin=-0.5, vmax=classes - 0.5,
               edgecolors="k", s=60 if len(yc) < 50 else 20)
    acc = summary.get("accuracy_manual")
    ax.set_title(f"{spec.name}: manual model's predicted class"
                 + (f" (train accuracy {100 * acc:.1f} %)" if acc is not None else ""))
    ax.set_xlabel("x0")
    ax.set_ylabel("x1")
    fig.tight_layout()
    _save_png(fig, path)
