"""Run the manual MLP and the autograd twin side by side from the same parameters and data.

Two kinds of check: gradients at a point (one forward/backward on each side) and training runs
(N steps of forward, backward and update on each side, comparing the per-step losses and the
final parameters).  Both return lists of `Verdict`s from refnet.compare.  `spec_checks` adds the
float64 finite-difference oracle (refnet.oracles.fd).  Data: refnet.data.load_data.
"""
import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

import manual
from manual.losses import check_labels, labels_checked
from manual.autocast import AutocastMLP
from manual.clip import clip_grad_norm
from manual.grad_scaler import GradScaler
from manual.mlp import MLP, init_params
from manual.schedules import make_schedule
from manual.step import accumulated_grads
from refnet import data as datasets
from refnet import not_bitwise
from refnet import twin as twin_mod
from refnet.compare import (Check, compare_curves, compare_tensors, magnitude, required_tier,
                            tolerance)
from refnet.data import load_data
from refnet.oracles import fd
from refnet.spec import Spec


@dataclass
class Pair:
    """A manual MLP and its autograd twin built from one spec, starting from the same parameters."""
    spec: Spec
    mlp: MLP
    twin: twin_mod.Twin
    twin_loss: torch.nn.Module
    twin_opt: torch.optim.Optimizer
    schedule: object = None          # spec.lr_schedule: manual.schedules' schedule (None: off)
    twin_sched: object = None        # and the stock torch.optim.lr_scheduler object
    amp: object = None               # spec.autocast: manual.autocast.AutocastMLP over mlp
    scaler: object = None            # spec.grad_scaler: manual.grad_scaler.GradScaler
    twin_scaler: object = None       # and torch.amp.GradScaler


def build_pair(spec, params=None):
    """Build both sides.  params: dict in nn.Linear layout; default: seeded init of the spec.
    With spec.lr_schedule each side also gets its schedule (manual.schedules / torch's)."""
    dtype, device = spec.torch_dtype, spec.device
    if params is None:
        params = init_params(spec.sizes, spec.activation, spec.bias, scheme=spec.init,
                             seed=spec.seed, dtype=dtype, device=device, k=spec.k,
                             norm=spec.norm, embedding=spec.embedding, blocks=spec.blocks)
    params = {name: t.detach().to(dtype=dtype, device=device).clone() for name, t in params.items()}
    opt_settings = dict(spec.optimizer)
    opt_name = opt_settings.pop("name")
    # dropout: both sides draw from their own stream seeded with spec.seed (manual/dropout.py)
    mlp = MLP(params, spec.activation, spec.loss, manual.make_optimizer(opt_name, **opt_settings),
              **spec.options, reg=spec.reg, **spec.layer_options,
              generator=torch.Generator().manual_seed(spec.seed))
    twin = twin_mod.Twin(spec.sizes, spec.activation, spec.bias, dtype=dtype, device=device,
                         **spec.options, **spec.layer_options, seed=spec.seed)
    twin_mod.load_params(twin, params)
    twin_opt = twin_mod.make_optimizer(twin, opt_name, **opt_settings)
    schedule = make_schedule(spec.lr_schedule, mlp.optimizer.lr, spec.steps)
    twin_sched = twin_mod.make_scheduler(twin_opt, spec.lr_schedule, spec.steps)
    pair = Pair(spec, mlp, twin, twin_mod.loss_module(spec.loss, spec.reg, twin), twin_opt,
                schedule, twin_sched)
    if spec.autocast is not None:
        pair.amp = AutocastMLP(mlp, spec.autocast)
        settings = spec.scaler_settings
        if settings is not None:
            pair.scaler = GradScaler(**settings)
            pair.twin_scaler = twin_mod.make_grad_scaler(settings, device)
    return pair


def twin_forward_backward(pair, x, target, input_grad=True):
    """One forward/backward of the twin; returns (loss, output, grad of x or None)."""
    pair.twin_opt.zero_grad(set_to_none=True)
    xt = x.detach().clone().requires_grad_(input_grad)
    out = pair.twin(xt)
    loss = pair.twin_loss(out, target)
    loss.backward()
    return loss.detach(), out.detach(), (xt.grad if input_grad else None)


def gradient_checks(pair, x, target, strict_bits=False, prefix=""):
    """Loss, output, every parameter gradient and the input gradient: manual vs twin.
    Under spec.autocast: the loss and the parameter gradients of one autocast step
    (autocast_gradient_checks)."""
    if pair.amp is not None:
        return autocast_gradient_checks(pair, x, target, strict_bits, prefix)
    tier = required_tier(strict_bits=strict_bits)
    trace = {}
    loss_m, cache = pair.mlp.forward(x, target, trace=trace)
    grads_m, dx_m = pair.mlp.backward(cache)
    out_m = trace["output"]
    # integer token inputs (embedding) have no gradient; embed.weight.grad stands for it
    loss_t, out_t, dx_t = twin_forward_backward(pair, x, target, x.is_floating_point())
    verdicts = [compare_tensors(prefix + "loss", loss_m, loss_t, "forward", tier=tier),
                compare_tensors(prefix + "output", out_m, out_t, "forward", tier=tier)]
    grads_t = twin_mod.grads_of(pair.twin)
    # One scale for the tolerance's absolute term: the largest gradient of this backward.  A
    # gradient that is mathematically zero (a bias in front of batch norm) is rounding noise
    # of that size, not of its own (refnet.compare.scaled_atol; matters where graded at tolerance).
    scale = max([magnitude(g) for g in grads_t.values()]
                + [magnitude(dx_t) if dx_t is not None else 0.0])
    for name, g in grads_m.items():
        verdicts.append(compare_tensors(f"{prefix}{name}.grad", g, grads_t[name], "grad",
                                        tier=tier, scale=scale))
    if dx_t is not None:
        verdicts.append(compare_tensors(prefix + "input.grad", dx_m, dx_t, "grad",
                                        tier=tier, scale=scale))
    return verdicts


def grading_bounds(spec, kind):
    """{rtol, atol} for compare_tensors / compare_curves where the default float32 ones do not
    fit: autocast on CUDA, where both sides differ in L's precision (refnet.not_bitwise,
    "autocast:*"): L's TOLERANCES.  {} elsewhere (the compared tensors' own dtype decides)."""
    if spec.autocast is None or not str(spec.device).startswith("cuda"):
        return {}
    rtol, atol = tolerance(spec.autocast_dtype, kind)
    return {"rtol": rtol, "atol": atol}


def autocast_gradient_checks(pair, x, target, strict_bits=False, prefix=""):
    """Under autocast: the float32 loss and the float32 parameter gradients (cast up at the
    leaves) of manual.autocast.AutocastMLP vs the twin's forward and loss inside torch.autocast
    (on CUDA graded with L's tolerances: grading_bounds)."""
    tier = required_tier(strict_bits=strict_bits)
    fwd, grad = grading_bounds(pair.spec, "forward"), grading_bounds(pair.spec, "grad")
    loss_m, cache = pair.amp.forward(x, target)
    grads_m = pair.amp.backward(cache)
    pair.twin_opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=pair.spec.autocast_dtype):
        loss_t = pair.twin_loss(pair.twin(x), target)
    loss_t.backward()
    grads_t = twin_mod.grads_of(pair.twin)
    return [compare_tensors(prefix + "loss", loss_m, loss_t.detach(), "forward", tier=tier,
                            **fwd)] + [
        compare_tensors(f"{prefix}{name}.grad", g, grads_t[name], "grad", tier=tier, **grad)
        for name, g in grads_m.items()]


@dataclass
class StepOut:
    """One lockstep step: each side's loss before the update (detached; accumulated: the sum of
    the micro-batches' loss / k, in order) and, when asked (data-parallel grading), the gradients
    each side applied (manual: after the reduction).  lr_m / lr_t: the rate each side's
    optimizer stepped with (Python floats; None without a schedule); norm_m / norm_t: the total
    gradient norm each side's clipping measured and coef the manual clip coefficient (0-d
    tensors; None without clipping)."""
    loss_m: torch.Tensor | None
    loss_t: torch.Tensor | None
    grads_m: dict | None = None
    grads_t: dict | None = None
    lr_m: float | None = None
    lr_t: float | None = None
    norm_m: torch.Tensor | None = None
    norm_t: torch.Tensor | None = None
    coef: torch.Tensor | None = None
    scale_m: float | None = None          # grad_scaler: the loss scale of the step, each side
    scale_t: float | None = None
    stepped_m: bool = True                # grad_scaler: False where the side skipped the step
    stepped_t: bool = True

    @property
    def clipped(self):
        """True when clipping scaled the gradients down this step (coefficient < 1)."""
        return self.coef is not None and bool(self.coef < 1)


def lockstep_step(pair, xb, tb, dp=None, keep_grads=False):
    """One training step of both sides on the same batch; a StepOut.

    xb, tb: one batch, or (spec.accumulate > 1) lists of the k micro-batches of the step.
    dp: the data-parallel hook (refnet.dp_pair.DPPair): rank 0's buffers broadcast before the
    forward, the manual gradients averaged over the ranks, the twin run through DDP.
    The step is three phases: gradients (k micro-batches, each loss divided by k, summed in
    AccumulateGrad's order: manual/step.py), the data-parallel reduction, and the update
    (clipping: manual/clip.py vs clip_grad_norm_; the optimizer's step at the schedule's rate,
    then the schedule's step).  Autocast and the GradScaler go in the first and last phases.
    """
    if pair.amp is not None:
        return _autocast_step(pair, xb, tb, dp, keep_grads)
    if dp is not None:
        dp.sync_buffers()
    micro = list(zip(xb, tb)) if isinstance(xb, (list, tuple)) else [(xb, tb)]
    # gradients
    grads_m, loss_m = _manual_grads(pair.mlp, micro)
    loss_t = _twin_grads(pair, micro, pair.twin if dp is None else dp.ddp)
    # reduction
    if dp is not None:
        grads_m = dp.reducer.reduce(grads_m)
    grads_t = ({n: g.detach().clone() for n, g in twin_mod.grads_of(pair.twin).items()}
               if keep_grads else None)
    # update
    out = StepOut(loss_m.detach(), loss_t.detach(), grads_m if keep_grads else None, grads_t)
    grads_m = _clip(pair, grads_m, out)
    _set_rates(pair, out)
    pair.mlp.step(grads_m)
    pair.twin_opt.step()
    _step_schedules(pair)
    return out


def _set_rates(pair, out):
    """The schedule's rate of this step onto the manual optimizer; both sides' rates into out."""
    if pair.schedule is not None:
        out.lr_m = pair.mlp.optimizer.lr = pair.schedule.lr
        out.lr_t = pair.twin_opt.param_groups[0]["lr"]


# torch warns "lr_scheduler.step() before optimizer.step()" when a GradScaler skipped the very
# first optimizer step (it patches opt.step to count calls); the stock script warns the same, and
# the rates are still the schedule's (graded every step), so the twin's warning is not shown.
_SKIPPED_FIRST_STEP = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


def _step_schedules(pair):
    """After the optimizers' step, as ``opt.step(); sched.step()``."""
    if pair.schedule is not None:
        pair.schedule.step()
        with warnings.catch_warnings():
            if pair.twin_scaler is not None:
                warnings.filterwarnings("ignore", _SKIPPED_FIRST_STEP, UserWarning)
            pair.twin_sched.step()


def _autocast_step(pair, xb, tb, dp=None, keep_grads=False):
    """One step under autocast (spec.autocast), each side whole: manual.autocast.AutocastMLP's
    train_step (its casts written out; with spec.grad_scaler manual/grad_scaler.py's scale,
    unscale, inf check, skip and update) vs refnet.twin.autocast_step, the stock script
    (``with torch.autocast``, ``scaler.scale(loss).backward()``, ``scaler.step``,
    ``scaler.update``), over spec.accumulate micro-batches and with spec.clip_grad_norm after
    the scaler's unscale_.  out.scale_m / scale_t: the loss scale the step used; out.stepped_m /
    stepped_t: whether each side's optimizer stepped (a GradScaler skips on overflow).
    dp: the manual float32 gradients (scaled, when a scaler is on) averaged between the last
    backward and the scaler's unscale, as DDP's all-reduce runs inside the twin's backward; the
    twin runs through DDP.  keep_grads: the gradients each side applied (after the unscale and
    the clip)."""
    out = StepOut(None, None)
    _set_rates(pair, out)
    if pair.scaler is not None:
        # the twin's scale tensor is made at its first use: get_scale() is init_scale until then
        # (a double); the step multiplies by the float32 tensor, so that is the value recorded
        twin_scale = torch.tensor(pair.twin_scaler.get_scale(), dtype=torch.float32)
        out.scale_m, out.scale_t = float(pair.scaler.scale), float(twin_scale)
    reduce = None
    if dp is not None:
        dp.sync_buffers()
        reduce = dp.reducer.reduce
    clip = pair.spec.clip_grad_norm
    order = [name for name, _ in pair.twin.named_parameters()]
    m = pair.amp.train_step(xb, tb, pair.scaler, clip, order, reduce=reduce)
    t = twin_mod.autocast_step(pair.twin if dp is None else dp.ddp, pair.twin_loss, pair.twin_opt,
                               xb, tb, pair.spec.autocast_dtype, pair.twin_scaler, clip)
    out.loss_m, out.loss_t = m["loss"].detach(), t["loss"]
    out.stepped_m, out.stepped_t = m["stepped"], t["stepped"]
    out.norm_m, out.coef, out.norm_t = m["total_norm"], m["clip_coef"], t["total_norm"]
    if keep_grads:
        out.grads_m = m["grads"]
        out.grads_t = {n: g.detach().clone() for n, g in twin_mod.grads_of(pair.twin).items()}
    _step_schedules(pair)
    return out


def _manual_grads(mlp, micro):
    """The manual gradients of one step over its micro-batches (manual.step.accumulated_grads:
    each backward seeded with 1/k, summed in AccumulateGrad's order) and the step's loss,
    Σ loss_i / k added in micro-batch order."""
    grads, losses = accumulated_grads(mlp, micro)
    return grads, sum(losses[1:], losses[0])


def _twin_grads(pair, micro, model):
    """The stock script: zero_grad, then (criterion(model(x), y) / k).backward() per micro-batch.
    Under DDP the first k - 1 forward/backward pairs run inside ``model.no_sync()`` (local
    AccumulateGrad, no all-reduce) and the last backward all-reduces the accumulated ``.grad``
    (the DDP accumulation idiom; nanoGPT's require_backward_grad_sync on the last micro-step).
    The loss."""
    pair.twin_opt.zero_grad(set_to_none=True)
    loss = None
    for i, (x, target) in enumerate(micro):
        local = i < len(micro) - 1 and isinstance(model, DistributedDataParallel)
        with model.no_sync() if local else contextlib.nullcontext():
            loss_i = pair.twin_loss(model(x), target) / len(micro)
            loss_i.backward()
        loss = loss_i.detach() if loss is None else loss + loss_i.detach()
    return loss


def _clip(pair, grads_m, out):
    """spec.clip_grad_norm on both sides (after the reduction, as DDP scripts clip): the manual
    gradients clipped in the twin's parameters() order, the twin's by clip_grad_norm_; the norms
    and the coefficient into out.  Without clipping: grads_m unchanged."""
    config = pair.spec.clip_grad_norm
    if config is None:
        return grads_m
    order = [name for name, _ in pair.twin.named_parameters()]
    grads_m, out.norm_m, out.coef = clip_grad_norm({n: grads_m[n] for n in order},
                                                   config["max_norm"], config["norm_type"])
    out.norm_t = twin_mod.clip_grads(pair.twin, config).detach()
    return grads_m


def lockstep_batches(pair, x, target, steps, batch_size=None, seed=0, start=0, shard=None):
    """(step, x_batch, target_batch) for steps start … start + steps - 1 of the seeded schedule
    (refnet.data.batches), so a resumed run sees exactly the batches an uninterrupted one would.
    With spec.accumulate k > 1 each step takes the next k batches of that schedule, and
    x_batch / target_batch are lists of the k micro-batches.
    shard(idx, n): this rank's rows of a global batch (data parallel; refnet.dp_pair)."""
    k = getattr(pair.spec, "accumulate", 1)
    if getattr(pair.spec, "norm", None) == "batchnorm":
        datasets.check_batch_rows(x.shape[0], batch_size)   # the real row count, not a guess
    if k > 1:
        check_micro_batches(x.shape[0], batch_size, k)
    index_list = datasets.batches(x.shape[0], batch_size, (start + steps) * k, seed)[start * k:]
    labels, n_classes = target.dtype == torch.int64, pair.spec.sizes[-1]
    if labels:  # class labels: range-checked once for the data set, not per batch (a CUDA sync)
        check_labels(target, n_classes)
    for step in range(start, start + steps):
        micro = [_rows(x, target, idx, shard, labels, n_classes)
                 for idx in index_list[(step - start) * k:(step - start + 1) * k]]
        if k == 1:
            yield (step,) + micro[0]
        else:
            yield step, [xb for xb, _ in micro], [tb for _, tb in micro]


def _rows(x, target, idx, shard, labels, n_classes):
    """One batch's rows (idx None: the whole data set)."""
    if shard is not None:
        idx = shard(idx, x.shape[0])
    if idx is None:
        return x, target
    idx = idx.to(x.device)
    xb, tb = x[idx], target[idx]
    if labels:
        labels_checked(tb, n_classes)
    return xb, tb


def check_micro_batches(n_rows, batch_size, k):
    """accumulate k needs k distinct micro-batches of batch_size rows: batch_size set and the data
    set at least k·batch_size rows; else one line saying so."""
    if batch_size is None:
        raise ValueError(f"accumulate: {k} micro-batches per step need a batch_size; the spec "
                         f"has none (full batch)")
    if n_rows < k * batch_size:
        raise ValueError(f"accumulate: {k} micro-batches of {batch_size} rows need at least "
                         f"{k * batch_size} rows; the data set has {n_rows}")


def train_lockstep(pair, x, target, steps, batch_size=None, seed=0, on_step=None, start=0,
                   before_step=None, record=None, keep_grads=False):
    """Train both sides for `steps` steps on the same mini-batches, unchecked (the checks that
    grade a whole run afterwards use it; refnet.train is the checked run).

    Returns (manual losses, twin losses) as 1-D tensors (the loss of each step before its update).
    on_step(step, loss_manual, loss_twin) is called after every step when given;
    before_step(step, x_batch, target_batch) before every step's update (refnet.check_training).
    start: the step to begin at (lockstep_batches).  record: a list to append each step's
    StepOut to (the learning rates and clip norms: step_curves); keep_grads: each StepOut also
    keeps the step's summed gradients, before clipping (lockstep_step; the fixtures record them).
    """
    losses_m, losses_t = [], []
    for step, xb, tb in lockstep_batches(pair, x, target, steps, batch_size, seed, start):
        if before_step is not None:
            before_step(step, xb, tb)
        out = lockstep_step(pair, xb, tb, keep_grads=keep_grads)
        if record is not None:
            record.append(out)
        losses_m.append(out.loss_m)
        losses_t.append(out.loss_t)
        if on_step is not None:
            on_step(step, out.loss_m, out.loss_t)
    return torch.stack(losses_m), torch.stack(losses_t)


def curve_checks(pair, x, target, steps, batch_size=None, seed=0, strict_bits=False, record=None,
                 keep_grads=False):
    """Train in lockstep; compare the loss curves (and, with a schedule or clipping, the
    learning rates and total norms of every step: step_curves) and the final parameters
    (named final.*).  record: a list to append each step's StepOut to (keep_grads: with the
    step's gradients, train_lockstep)."""
    tier = required_tier(strict_bits=strict_bits)
    outs = [] if record is None else record
    losses_m, losses_t = train_lockstep(pair, x, target, steps, batch_size, seed, record=outs,
                                        keep_grads=keep_grads)
    bounds = grading_bounds(pair.spec, "curve")
    verdicts = [compare_curves("loss_curve", losses_m, losses_t, tier=tier, **bounds)]
    verdicts += step_curves(outs, strict_bits)
    final_t = twin_mod.params_of(pair.twin)
    for name, p in pair.mlp.params.items():
        verdicts.append(compare_tensors(f"final.{name}", p, final_t[name], "curve", tier=tier,
                                        **bounds))
    return verdicts, (losses_m, losses_t)


def step_curves(outs, strict_bits=False):
    """The per-step learning rates (float64, the Python floats each side's optimizer used), clip
    total norms, GradScaler scales and skipped steps of a run's StepOuts, manual vs twin; [] for
    a run with none of them."""
    tier = required_tier(strict_bits=strict_bits)
    verdicts = []
    if outs and outs[0].lr_m is not None:
        lrs = [torch.tensor([getattr(o, side) for o in outs], dtype=torch.float64)
               for side in ("lr_m", "lr_t")]
        verdicts.append(compare_curves("lr_curve", *lrs, tier=tier))
    if outs and outs[0].norm_m is not None:
        # under a GradScaler an overflow step's total norm is inf or NaN on both sides (the step
        # is skipped): NaN at the same steps is agreement there, never without a scaler
        verdicts.append(compare_curves("clip_norm_curve", torch.stack([o.norm_m for o in outs]),
                                       torch.stack([o.norm_t for o in outs]),
                                       tier=tier, nan_propagation=outs[0].scale_m is not None))
    if outs and outs[0].scale_m is not None:
        scales = [torch.tensor([getattr(o, side) for o in outs], dtype=torch.float64)
                  for side in ("scale_m", "scale_t")]
        verdicts.append(compare_curves("scale_curve", *scales, tier=tier))
        skipped = [torch.tensor([not getattr(o, side) for o in outs])
                   for side in ("stepped_m", "stepped_t")]
        verdicts.append(compare_tensors("skipped_steps", *skipped, "curve",
                                        tier=tier))
    return verdicts


def twin_checks(spec, x, target, strict_bits=False, prefix="", record=None):
    """Manual vs autograd for one spec: gradients at init, the loss curve over spec.steps (its
    batch schedule) and the final parameters, each with its expected tier (refnet.not_bitwise:
    bitwise on CPU, tolerance on CUDA; an op of the table states its own, None = no bound through
    training) and the table's note.  record: a list for the training run's StepOuts."""
    note = not_bitwise.note(spec)
    grad_tier = not_bitwise.expected_tier(spec, spec.device, "grad")
    train_tier = not_bitwise.expected_tier(spec, spec.device, "training")
    checks = [Check(f"{prefix}grad@init", gradient_checks(build_pair(spec), x, target, strict_bits),
                    note=note, expected=grad_tier)]
    verdicts, _ = curve_checks(build_pair(spec), x, target, spec.steps, spec.batch_size, spec.seed,
                               strict_bits, record)
    final = [v for v in verdicts if v.name.startswith("final.")]
    checks.append(Check(f"{prefix}loss_curve[{spec.steps}]", verdicts[:len(verdicts) - len(final)],
                        note=note, expected=train_tier))
    checks.append(Check(f"{prefix}final_params", final, note=note, expected=train_tier))
    return checks


def spec_checks(spec, strict_bits=False, data=None, fd_settings=None, record=None):
    """The checks of a user's spec: twin_checks, then finite differences and gradcheck in float64
    (refnet.oracles.fd).  data: (x, target) instead of the spec's data set; record: a list for
    the training run's StepOuts."""
    x, target = load_data(spec) if data is None else data
    return twin_checks(spec, x, target, strict_bits, record=record) + fd.fd_checks(
        spec, data=data, settings=fd_settings)
