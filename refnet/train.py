"""Train the manual MLP and its autograd twin in lockstep, checking as it goes that they agree.

Both sides start from the same parameters and see the same mini-batches (refnet.harness).  The
losses of the two sides are compared at every step (on CUDA: gathered on the device and compared
at each check point, so the GPU is synchronized only there) and the parameters every
`check_every` steps.  The first comparison worse than the allowed tier stops the run with a
message naming the step, the tensor, the tier and both values.  Ctrl-C stops at the next step
boundary, writes a checkpoint and says how to resume.

Outputs in out_dir: losses.csv, summary.json, checkpoint.pt (format: refnet/checkpoint.py) and,
when matplotlib is installed, loss_curves.png and (2-D classification data)
decision_boundary.png (refnet/plots.py).  Every file is written atomically.
"""
import os
import signal
import sys
import threading
import time

import torch

from refnet import examples, harness, not_bitwise
from refnet.data import load_data
from refnet import twin as twin_mod
from refnet.checkpoint import (CHECKPOINT_NAME, check_resume_spec,
                               load_checkpoint, restore_run, save_run)
from refnet.compare import TIERS, compare_curves, compare_tensors, same_bits
from refnet.run_outputs import run_summary, write_outputs
from refnet.settings import determinism, resolve_devices
from refnet.spec import Spec

ALLOWED_TIERS = ("bitwise", "ulp", "tolerance")


def default_tier(spec):
    """The tier a run is held to: refnet.not_bitwise's expectation for gradients (bitwise on CPU;
    tolerance on CUDA or when the spec uses a known non-bitwise op, whose 1-ulp differences
    compound)."""
    return not_bitwise.expected_tier(spec, spec.device, "grad")


# -- the run --

class _Stop(Exception):
    def __init__(self, status, message=""):
        super().__init__(message)
        self.status, self.message = status, message


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
    example: a name of the example registry (refnet.examples), whose data/params replace the
        spec's when given.
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
        check_resume_spec(spec, saved)
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
    created = out_dir is not None and not os.path.exists(out_dir)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)  # early: an unwritable --out fails before training
    try:
        if example is not None:
            ex = examples.get(example)
            data = ex.training_data(spec) if data is None else data
            params = ex.initial_params(spec) if params is None else params
        with determinism(spec.device):
            return _run(spec, out_dir, check_every, tier, checkpoint, progress, example, data,
                        params, on_step)
    except BaseException:  # an error or Ctrl-C before anything was written: leave no empty --out
        if created and os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise


def _run(spec, out_dir, check_every, tier, checkpoint, progress, example, data, params, on_step):
    started = time.time()
    device, cuda = spec.device, spec.device == "cuda"
    x, target = data if data is not None else load_data(spec)
    pair = harness.build_pair(spec, params)
    start, hist_m, hist_t = 0, [], []
    if checkpoint is not None:
        restore_run(pair, checkpoint, device)
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

    def grade_bitwise():
        state["checks"] += 1

    def flush_losses():
        if not pending_m:
            return
        window_m, window_t = torch.stack(pending_m), torch.stack(pending_t)
        hist_m.append(window_m)
        hist_t.append(window_t)
        pending_m.clear()
        pending_t.clear()
        # NaN at the same steps agrees here: the summary reports non-finite steps in its own
        # fields (first_nonfinite_step, status), so the curve check is one of NaN propagation
        verdict = compare_curves("loss", window_m, window_t, required=tier, nan_propagation=True)
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
        if not cuda and not at_check and bool(same_bits(loss_m, loss_t)) \
                and bool(torch.isfinite(loss_m)):
            pending_m.pop()               # identical finite losses: a bitwise check, no grading
            pending_t.pop()               # work (this is the per-step hot path on CPU)
            hist_m.append(loss_m.reshape(1))
            hist_t.append(loss_t.reshape(1))
            grade_bitwise()
        elif not cuda or at_check:
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
    summary = run_summary(spec, example, tier, state, status, message, start, losses_m,
                          losses_t, pair, x, target, time.time() - started)
    if out_dir is not None:
        write_outputs(out_dir, spec, summary, losses_m, losses_t, pair, x, target)
    return summary


def _divergence(step, tensor, verdict, tier, spec):
    return (f"step {step}: {tensor} diverged beyond the {tier} tier on {spec.device}/{spec.dtype}: "
            + verdict.message(tier, sides=("manual", "twin")))


def _save(out_dir, pair, spec, example, step, hist_m, hist_t, state):
    hist_m[:], hist_t[:] = [torch.cat(hist_m)], [torch.cat(hist_t)]   # concatenated once
    save_run(os.path.join(out_dir, CHECKPOINT_NAME), pair, spec, example, step,
             hist_m[0], hist_t[0], state["worst"])
    state["last_checkpoint"] = step


def _progress_bar(progress, spec, start):
    if progress is False:
        return None
    try:
        from tqdm import tqdm  # optional dependency (refnet[progress])
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
