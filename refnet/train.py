"""The lockstep training run: the manual MLP and its autograd twin trained side by side, checked
as they go, on one process or data-parallel on N (one loop for both).

Both sides start from the same parameters and see the same mini-batches (refnet.harness).  The
losses of the two sides are compared at every step (on CUDA: gathered on the device and compared
at each check point, so the GPU is synchronized only there) and the parameters every
`check_every` steps.  The first comparison worse than the allowed tier stops the run with a
message naming the step, the tensor, the tier and both values.  Ctrl-C stops at the next step
boundary, writes a checkpoint and says how to resume.

Data parallel (refnet.dp_train starts it on each rank): the same loop with the rank's
refnet.dp_pair.DPPair as its hook, nanoGPT's `if ddp:` — each rank trains its shard, also grades
the reduced gradients against DDP's at every step, the ranks agree on every verdict, the
parameters must be identical on every rank at each check point, and rank 0 alone writes.

Outputs in out_dir: losses.csv, summary.json, checkpoint.pt (format: refnet/checkpoint.py) and,
when matplotlib is installed, loss_curves.png and (2-D classification data)
decision_boundary.png (refnet/plots.py).  Every file is written atomically.
"""
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from refnet import examples, harness, not_bitwise
from refnet.data import load_data
from refnet import twin as twin_mod
from refnet.checkpoint import CHECKPOINT_NAME, check_resume, load_checkpoint, restore_run, save_run
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


# -- what a run is asked to do, and where it stands --

STEP_COLUMNS = ("lrs", "clip_norms", "clip_coefs", "scales", "skipped")   # RunState's per-step lists

@dataclass(frozen=True)
class RunConfig:
    """What a run was asked to do; fixed for the run."""
    spec: Spec
    tier: str                       # the worst agreement allowed (ALLOWED_TIERS)
    check_every: int = 50           # compare the parameters, write a checkpoint: every K steps
    out_dir: str | None = None      # None: nothing written
    example: str | None = None      # the example registry's name, recorded in the outputs
    on_step: object = None          # on_step(step, loss_manual, loss_twin) after each update
    progress: bool | None = False   # True / False / None (train's `progress`)

    def at_check(self, done):
        return done % self.check_every == 0 or done == self.spec.steps


@dataclass
class RunState:
    """Where a run stands: what the loop carries from step to step and what a checkpoint saves
    beside the pair's own state (parameters, optimizer states, buffers, dropout streams).  A
    feature whose state is the model's or the optimizer's (a GradScaler, an LR schedule) keeps
    it in the pair, saved and restored by refnet.checkpoint; what belongs to the loop itself
    (e.g. the micro-batch within an accumulated step) is a field here."""
    start: int = 0                                  # the step the run began at (resumed: > 0)
    step: int = 0                                   # steps done
    hist_m: list = field(default_factory=list)      # each step's loss (data parallel: the mean
    hist_t: list = field(default_factory=list)      # over ranks), 1-element tensors or runs of them
    pending: list = field(default_factory=list)     # (step, loss_m, loss_t) of this process, ungraded
    worst: str = "bitwise"                          # the worst tier seen
    checks: int = 0                                 # comparisons made
    last_checkpoint: int | None = None              # the step of the last checkpoint written
    interrupted: bool = False                       # Ctrl-C seen: stop at the step boundary
    status: str = "completed"                       # completed | diverged | interrupted
    message: str = ""
    lrs: list = field(default_factory=list)         # each step's learning rate (lr_schedule)
    clip_norms: list = field(default_factory=list)  # each step's total gradient norm and clip
    clip_coefs: list = field(default_factory=list)  # coefficient (clip_grad_norm; manual's)
    scales: list = field(default_factory=list)      # each step's loss scale (grad_scaler) and
    skipped: list = field(default_factory=list)     # 1 where the scaler skipped the step, else 0

    @classmethod
    def resumed(cls, ck, device):
        step = int(ck["step"])
        steps = ck.get("step_columns") or {}
        return cls(start=step, step=step, hist_m=[ck["losses_manual"].to(device)],
                   hist_t=[ck["losses_twin"].to(device)], worst=ck.get("worst_tier", "bitwise"),
                   **{k: list(steps.get(k, [])) for k in STEP_COLUMNS})

    def record(self, out):
        """A step's learning rate and clip norm / coefficient (when the spec has them)."""
        if out.lr_m is not None:
            self.lrs.append(out.lr_m)
        if out.norm_m is not None:
            self.clip_norms.append(float(out.norm_m))
            self.clip_coefs.append(float(out.coef))
        if out.scale_m is not None:
            self.scales.append(out.scale_m)
            self.skipped.append(int(not out.stepped_m))

    def step_columns(self):
        """The per-step columns beyond the losses (STEP_COLUMNS: learning rate, clip norm and
        coefficient, loss scale, skipped) for those the run records, {name: [...]}
        (checkpointed and in losses.csv)."""
        return {k: list(getattr(self, k)) for k in STEP_COLUMNS if getattr(self, k)}

    def grade(self, verdict):
        self.checks += 1
        self.worst = max(self.worst, verdict.tier, key=TIERS.index)

    def history(self):
        """(manual losses, twin losses) so far as 1-D tensors (the lists concatenated once)."""
        if not self.hist_m:
            return torch.zeros(0), torch.zeros(0)
        self.hist_m[:], self.hist_t[:] = [torch.cat(self.hist_m)], [torch.cat(self.hist_t)]
        return self.hist_m[0], self.hist_t[0]


class _Stop(Exception):
    def __init__(self, status, message=""):
        super().__init__(message)
        self.status, self.message = status, message


# -- one process --

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
        spec = spec or Spec.from_dict(dict(checkpoint["spec"]))
        check_resume(checkpoint, spec, world_size=1)
        example = example or checkpoint["example"]
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a refnet Spec, got {type(spec).__name__}")
    if spec.device == "cuda":
        resolve_devices("cuda")  # a clear error without a GPU
    tier = tier or default_tier(spec)
    if tier not in ALLOWED_TIERS:
        raise ValueError(f"--tier: expected one of {', '.join(ALLOWED_TIERS)}, got {tier!r}")
    cfg = RunConfig(spec, tier, check_every, out_dir, example, on_step, progress)
    created = out_dir is not None and not os.path.exists(out_dir)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)  # early: an unwritable --out fails before training
    try:
        if example is not None:
            ex = examples.get(example)
            data = ex.training_data(spec) if data is None else data
            params = ex.initial_params(spec) if params is None else params
        x, target = data if data is not None else load_data(spec)
        with determinism(spec.device):
            return run_loop(cfg, harness.build_pair(spec, params), x, target, checkpoint)
    except BaseException:  # an error or Ctrl-C before anything was written: leave no empty --out
        if created and os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise


# -- the loop: one process, or one rank of N --

def run_loop(cfg, pair, x, target, checkpoint=None, dp=None):
    """The one training loop, for one process (dp None) or one data-parallel rank (dp: its
    refnet.dp_pair.DPPair).  Restores checkpoint when given; returns the summary (written to
    cfg.out_dir when given); data parallel: rank 0's, None on the other ranks."""
    started, spec = time.time(), cfg.spec
    state = RunState()
    if checkpoint is not None:
        restore_run(pair, checkpoint, spec.device, rank=0 if dp is None else dp.rank)
        state = RunState.resumed(checkpoint, spec.device)
        if dp is not None:  # a fresh DDP would use its first-iteration bucket again
            dp.resume_buckets(x, target, state.start)
    batches = harness.lockstep_batches(pair, x, target, spec.steps - state.start, spec.batch_size,
                                       spec.seed, state.start,
                                       shard=None if dp is None else dp.shard)
    bar = _progress_bar(cfg.progress if dp is None else False, spec, state.start)
    restore_sigint = _install_sigint(state) if dp is None else []  # ranks: the launcher's Ctrl-C
    try:
        for step, xb, tb in batches:
            _train_step(cfg, pair, state, step, xb, tb, dp, bar)
    except _Stop as stop:
        state.status, state.message = stop.status, stop.message
        if stop.status == "interrupted":
            _save_interrupted(cfg, pair, state)
    finally:
        if bar is not None:
            bar.close()
        for old in restore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_DFL if old is None else old)
    return _finish(cfg, pair, x, target, state, dp, time.time() - started)


def _train_step(cfg, pair, state, step, xb, tb, dp, bar):
    """One step of the loop: train, record, grade (data parallel: every rank agrees), checkpoint
    at check points, progress, stop on Ctrl-C."""
    out = harness.lockstep_step(pair, xb, tb, dp, keep_grads=dp is not None)
    loss_m, loss_t = out.loss_m, out.loss_t
    if dp is not None:
        loss_m, loss_t = dp.mean_loss(loss_m, loss_t)
    state.hist_m.append(loss_m.reshape(1))
    state.hist_t.append(loss_t.reshape(1))
    state.record(out)
    if cfg.on_step is not None:
        cfg.on_step(step, out.loss_m, out.loss_t)
    state.step = step + 1
    at_check = cfg.at_check(state.step)
    failures = _grade(cfg, pair, state, out, at_check, dp)
    if dp is not None:
        failures = dp.agree(failures)
    if failures:
        raise _Stop("diverged", failures[0])
    if at_check:
        _checkpoint(cfg, pair, state, dp)
        if bar is not None:
            bar.set_postfix(loss=f"{float(loss_m):.4g}", tier=state.worst, refresh=False)
    if bar is not None:
        bar.update(1)
    if state.interrupted and state.step < cfg.spec.steps:
        raise _Stop("interrupted", f"interrupted at step {state.step}")


# -- grading --

def _grade(cfg, pair, state, out, at_check, dp):
    """This step's comparisons, graded into state; the failure messages, first failure first:
    this process's losses, (data parallel) the reduced gradients vs DDP's, and at a check point
    the parameters (data parallel: and that every rank holds rank 0's)."""
    step = state.step - 1
    failures = _grade_loss(cfg, state, out.loss_m, out.loss_t, flush=at_check)
    failures += _grade_step(cfg, state, step, out)
    for name, g in (out.grads_m or {}).items():
        failures += _graded(cfg, state, step, f"{name}.grad", compare_tensors(
            f"{name}.grad", g, out.grads_t[name], tier=cfg.tier))
    if at_check:
        twin_params = twin_mod.params_of(pair.twin)
        for name, p in pair.mlp.params.items():
            failures += _graded(cfg, state, step, name, compare_tensors(
                name, p, twin_params[name], "curve", tier=cfg.tier,
                **harness.grading_bounds(cfg.spec, "curve")))
        if dp is not None:
            failures += _graded(cfg, state, step, "params vs rank 0", dp.same_params_verdict(),
                                "bitwise")
    return failures


def _grade_step(cfg, state, step, out):
    """The step's learning rate (the same Python float on both sides: bitwise on every device),
    clip total norm (the run's tier), and the GradScaler's scale and skip (bitwise), when the spec
    has them."""
    failures = []
    if out.lr_m is not None:
        lrs = (torch.tensor(lr, dtype=torch.float64) for lr in (out.lr_m, out.lr_t))
        failures += _graded(cfg, state, step, "lr", compare_tensors("lr", *lrs, "curve",
                                                                    tier="bitwise"), "bitwise")
    if out.norm_m is not None:
        failures += _graded(cfg, state, step, "clip.total_norm", compare_tensors(
            "clip.total_norm", out.norm_m, out.norm_t, tier=cfg.tier,
            **harness.grading_bounds(cfg.spec, "grad")))
    if out.scale_m is not None:   # the scaler's scale and skip: the same on both sides, always
        scales = (torch.tensor(v, dtype=torch.float64) for v in (out.scale_m, out.scale_t))
        failures += _graded(cfg, state, step, "grad_scaler.scale", compare_tensors(
            "grad_scaler.scale", *scales, "curve", tier="bitwise"), "bitwise")
        skipped = (torch.tensor(not v) for v in (out.stepped_m, out.stepped_t))
        failures += _graded(cfg, state, step, "grad_scaler.skipped", compare_tensors(
            "grad_scaler.skipped", *skipped, "curve", tier="bitwise"), "bitwise")
    return failures


def _graded(cfg, state, step, tensor, verdict, tier=None):
    """Grade verdict into state; [its divergence message] when it failed, else []."""
    state.grade(verdict)
    if verdict.passed:
        return []
    return [_divergence(step, tensor, verdict, tier or cfg.tier, cfg.spec)]


def _grade_loss(cfg, state, loss_m, loss_t, flush):
    """The step's two losses.  CPU: identical finite losses count as a bitwise check with no
    grading work (the per-step hot path); anything else is graded at once.  CUDA: kept on the
    device and graded at check points (flush), the GPU synchronized only there."""
    cuda = cfg.spec.device == "cuda"
    if not cuda and bool(same_bits(loss_m, loss_t)) and bool(torch.isfinite(loss_m)):
        state.checks += 1
        return []
    state.pending.append((state.step - 1, loss_m, loss_t))
    return _flush_losses(cfg, state) if flush or not cuda else []


def _flush_losses(cfg, state):
    """Grade the pending losses as one curve; [the first step beyond the tier] when it fails."""
    if not state.pending:
        return []
    steps, ms, ts = zip(*state.pending)
    state.pending.clear()
    # NaN at the same steps agrees here: the summary reports non-finite steps in its own
    # fields (first_nonfinite_step, status), so the curve check is one of NaN propagation
    bounds = harness.grading_bounds(cfg.spec, "curve")   # autocast on CUDA: L's tolerances
    verdict = compare_curves("loss", torch.stack(ms), torch.stack(ts), tier=cfg.tier,
                             nan_propagation=True, **bounds)
    state.grade(verdict)
    if not verdict.passed:
        for step, a, b in zip(steps, ms, ts):  # the first step beyond the tier
            v = compare_tensors("loss", a, b, "curve", tier=cfg.tier, **bounds)
            if not v.passed:
                return [_divergence(step, "loss", v, cfg.tier, cfg.spec)]
    return []


def _divergence(step, tensor, verdict, tier, spec):
    return (f"step {step}: {tensor} diverged beyond the {tier} tier on {spec.device}/{spec.dtype}: "
            + verdict.message(tier, sides=("manual", "twin")))


# -- checkpoints and the end of a run --

def _checkpoint(cfg, pair, state, dp):
    """Write the checkpoint: by this process, or (data parallel) by rank 0 with every rank's
    dropout streams, the other ranks waiting until it is written."""
    streams = dp.gather_streams() if dp is not None else None
    if cfg.out_dir is not None and (dp is None or dp.rank == 0):
        save_run(os.path.join(cfg.out_dir, CHECKPOINT_NAME), pair, cfg.spec, cfg.example, state,
                 world_size=1 if dp is None else dp.world_size, rank_streams=streams)
        state.last_checkpoint = state.step
    if dp is not None:
        dp.barrier()  # no rank runs ahead of a checkpoint being written


def _save_interrupted(cfg, pair, state):
    """Ctrl-C (one process): grade what is pending, then checkpoint and say how to resume."""
    failures = _flush_losses(cfg, state)
    if failures:
        state.status, state.message = "diverged", failures[0]
        return
    if cfg.out_dir is not None:
        _checkpoint(cfg, pair, state, None)
        state.message += f"; resume with --resume {cfg.out_dir}"


def _finish(cfg, pair, x, target, state, dp, seconds):
    """The summary (and the outputs, when cfg.out_dir): this process's, or rank 0's."""
    if dp is not None and dp.rank != 0:
        return None
    losses_m, losses_t = (t.cpu() for t in state.history())
    summary = run_summary(cfg.spec, cfg.example, cfg.tier, state, losses_m, losses_t, pair, x,
                          target, seconds)
    if dp is not None:
        summary.update(dp.summary_fields())
    if cfg.out_dir is not None:
        write_outputs(cfg.out_dir, cfg.spec, summary, losses_m, losses_t, pair, x, target,
                      state.step_columns())
    return summary


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
        if state.interrupted:
            raise KeyboardInterrupt
        state.interrupted = True

    return [signal.signal(signal.SIGINT, handler)]
