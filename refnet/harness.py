"""Run the manual MLP and the autograd twin side by side from the same parameters and data.

Two kinds of check: gradients at a point (one forward/backward on each side) and training runs
(N steps of forward, backward and update on each side, comparing the per-step losses and the
final parameters).  Both return lists of `Verdict`s from refnet.compare.  `spec_checks` adds the
float64 finite-difference oracle (refnet.oracles.fd).  Data: refnet.data.load_data.
"""
from dataclasses import dataclass

import torch

import manual
from manual.losses import check_labels, labels_checked
from manual.mlp import MLP, init_params
from refnet import data as datasets
from refnet import not_bitwise
from refnet import twin as twin_mod
from refnet.compare import Check, compare_curves, compare_tensors, magnitude
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


def build_pair(spec, params=None):
    """Build both sides.  params: dict in nn.Linear layout; default: seeded init of the spec."""
    dtype, device = spec.torch_dtype, spec.device
    if params is None:
        params = init_params(spec.sizes, spec.activation, spec.bias, scheme=spec.init,
                             seed=spec.seed, dtype=dtype, device=device, k=spec.k,
                             norm=spec.norm, embedding=spec.embedding)
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
    return Pair(spec, mlp, twin, twin_mod.loss_module(spec.loss, spec.reg, twin), twin_opt)


def twin_forward_backward(pair, x, target, input_grad=True):
    """One forward/backward of the twin; returns (loss, output, grad of x or None)."""
    pair.twin_opt.zero_grad(set_to_none=True)
    xt = x.detach().clone().requires_grad_(input_grad)
    out = pair.twin(xt)
    loss = pair.twin_loss(out, target)
    loss.backward()
    return loss.detach(), out.detach(), (xt.grad if input_grad else None)


def gradient_checks(pair, x, target, strict_bits=False, prefix=""):
    """Loss, output, every parameter gradient and the input gradient: manual vs twin."""
    trace = {}
    loss_m, cache = pair.mlp.forward(x, target, trace=trace)
    grads_m, dx_m = pair.mlp.backward(cache)
    out_m = trace["output"]
    # integer token inputs (embedding) have no gradient; embed.weight.grad stands for it
    loss_t, out_t, dx_t = twin_forward_backward(pair, x, target, x.is_floating_point())
    verdicts = [compare_tensors(prefix + "loss", loss_m, loss_t, "forward", strict_bits=strict_bits),
                compare_tensors(prefix + "output", out_m, out_t, "forward", strict_bits=strict_bits)]
    grads_t = twin_mod.grads_of(pair.twin)
    # One scale for the tolerance's absolute term: the largest gradient of this backward.  A
    # gradient that is mathematically zero (a bias in front of batch norm) is rounding noise
    # of that size, not of its own (refnet.compare.scaled_atol; matters where graded at tolerance).
    scale = max([magnitude(g) for g in grads_t.values()]
                + [magnitude(dx_t) if dx_t is not None else 0.0])
    for name, g in grads_m.items():
        verdicts.append(compare_tensors(f"{prefix}{name}.grad", g, grads_t[name], "grad",
                                        strict_bits=strict_bits, scale=scale))
    if dx_t is not None:
        verdicts.append(compare_tensors(prefix + "input.grad", dx_m, dx_t, "grad",
                                        strict_bits=strict_bits, scale=scale))
    return verdicts


@dataclass
class StepOut:
    """One lockstep step: each side's loss before the update (detached) and, when asked
    (data-parallel grading), the gradients each side applied (manual: after the reduction)."""
    loss_m: torch.Tensor
    loss_t: torch.Tensor
    grads_m: dict | None = None
    grads_t: dict | None = None


def lockstep_step(pair, xb, tb, dp=None, keep_grads=False):
    """One training step of both sides on the same batch; a StepOut.

    dp: the data-parallel hook (refnet.dp_pair.DPPair): rank 0's buffers broadcast before the
    forward, the manual gradients averaged over the ranks, the twin run through DDP.
    The step is three phases, which is where the next features go: gradients (gradient
    accumulation: k micro-batches summed here, DDP's no_sync on all but the last; autocast
    around the forwards and the GradScaler's scaled backward), the data-parallel reduction, and
    the update (clipping and the scaler's unscale/step before the optimizer's step, the LR
    schedule's step after it).
    """
    mlp = pair.mlp
    if dp is not None:
        dp.sync_buffers()
    # gradients
    loss_m, cache = mlp.forward(xb, tb)
    grads_m, _ = mlp.backward(cache)
    pair.twin_opt.zero_grad(set_to_none=True)
    loss_t = pair.twin_loss((pair.twin if dp is None else dp.ddp)(xb), tb)
    loss_t.backward()   # under DDP: the all-reduce of the twin's gradients happens here
    # reduction
    if dp is not None:
        grads_m = dp.reducer.reduce(grads_m)
    grads_t = ({n: g.detach().clone() for n, g in twin_mod.grads_of(pair.twin).items()}
               if keep_grads else None)
    # update
    mlp.step(grads_m)
    pair.twin_opt.step()
    return StepOut(loss_m.detach(), loss_t.detach(), grads_m if keep_grads else None, grads_t)


def lockstep_batches(pair, x, target, steps, batch_size=None, seed=0, start=0, shard=None):
    """(step, x_batch, target_batch) for steps start … start + steps - 1 of the seeded schedule
    (refnet.data.batches), so a resumed run sees exactly the batches an uninterrupted one would.
    shard(idx, n): this rank's rows of a global batch (data parallel; refnet.dp_pair)."""
    if getattr(pair.spec, "norm", None) == "batchnorm":
        datasets.check_batch_rows(x.shape[0], batch_size)   # the real row count, not a guess
    index_list = datasets.batches(x.shape[0], batch_size, start + steps, seed)[start:]
    labels, n_classes = target.dtype == torch.int64, pair.spec.sizes[-1]
    if labels:  # class labels: range-checked once for the data set, not per batch (a CUDA sync)
        check_labels(target, n_classes)
    for step, idx in enumerate(index_list, start):
        if shard is not None:
            idx = shard(idx, x.shape[0])
        if idx is None:
            yield step, x, target
            continue
        idx = idx.to(x.device)
        xb, tb = x[idx], target[idx]
        if labels:
            labels_checked(tb, n_classes)
        yield step, xb, tb


def train_lockstep(pair, x, target, steps, batch_size=None, seed=0, on_step=None, start=0,
                   before_step=None):
    """Train both sides for `steps` steps on the same mini-batches, unchecked (the checks that
    grade a whole run afterwards use it; refnet.train is the checked run).

    Returns (manual losses, twin losses) as 1-D tensors (the loss of each step before its update).
    on_step(step, loss_manual, loss_twin) is called after every step when given;
    before_step(step, x_batch, target_batch) before every step's update (refnet.check_training).
    start: the step to begin at (lockstep_batches).
    """
    losses_m, losses_t = [], []
    for step, xb, tb in lockstep_batches(pair, x, target, steps, batch_size, seed, start):
        if before_step is not None:
            before_step(step, xb, tb)
        out = lockstep_step(pair, xb, tb)
        losses_m.append(out.loss_m)
        losses_t.append(out.loss_t)
        if on_step is not None:
            on_step(step, out.loss_m, out.loss_t)
    return torch.stack(losses_m), torch.stack(losses_t)


def curve_checks(pair, x, target, steps, batch_size=None, seed=0, strict_bits=False):
    """Train in lockstep; compare the loss curves and the final parameters."""
    losses_m, losses_t = train_lockstep(pair, x, target, steps, batch_size, seed)
    verdicts = [compare_curves("loss_curve", losses_m, losses_t, strict_bits=strict_bits)]
    final_t = twin_mod.params_of(pair.twin)
    for name, p in pair.mlp.params.items():
        verdicts.append(compare_tensors(f"final.{name}", p, final_t[name], "curve",
                                        strict_bits=strict_bits))
    return verdicts, (losses_m, losses_t)


def twin_checks(spec, x, target, strict_bits=False, prefix=""):
    """Manual vs autograd for one spec: gradients at init, the loss curve over spec.steps (its
    batch schedule) and the final parameters, each with its expected tier (refnet.not_bitwise:
    bitwise on CPU, tolerance on CUDA; an op of the table states its own, None = no bound through
    training) and the table's note."""
    note = not_bitwise.note(spec)
    grad_tier = not_bitwise.expected_tier(spec, spec.device, "grad")
    train_tier = not_bitwise.expected_tier(spec, spec.device, "training")
    checks = [Check(f"{prefix}grad@init", gradient_checks(build_pair(spec), x, target, strict_bits),
                    note=note, expected=grad_tier)]
    verdicts, _ = curve_checks(build_pair(spec), x, target, spec.steps, spec.batch_size, spec.seed,
                               strict_bits)
    checks.append(Check(f"{prefix}loss_curve[{spec.steps}]", verdicts[:1], note=note,
                        expected=train_tier))
    checks.append(Check(f"{prefix}final_params", verdicts[1:], note=note, expected=train_tier))
    return checks


def spec_checks(spec, strict_bits=False, data=None, fd_settings=None):
    """The checks of a user's spec: twin_checks, then finite differences and gradcheck in float64
    (refnet.oracles.fd).  data: (x, target) instead of the spec's data set."""
    x, target = load_data(spec) if data is None else data
    return twin_checks(spec, x, target, strict_bits) + fd.fd_checks(spec, data=data,
                                                                      settings=fd_settings)
