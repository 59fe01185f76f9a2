"""One optimizer step as a training script runs it: k micro-batches, clipping, the schedule.

    for each of the k micro-batches:   loss_i = loss(batch_i) / k;   grads += ∂loss_i/∂θ
    clip the summed gradients to a global norm (optional; manual/clip.py)
    optimizer step at the schedule's current rate, then advance the schedule (manual/schedules.py)

The twin does ``(criterion(out, y) / k).backward()`` k times and lets AccumulateGrad sum into
``.grad``.  What decides the bits, mirrored here:

* the division's backward seeds each micro-batch's backward with ``dloss = 1 / k`` in the
  loss's dtype (``div.Scalar``: grad / k), so every micro-batch gradient is computed from that
  seed, not divided afterwards (seeding with 1 and dividing by k is not bitwise: tests/test_step.py);
* AccumulateGrad keeps the first gradient as it is (``zero_grad`` sets ``.grad`` to None, so
  there is no ``0 + g``: a −0.0 stays −0.0) and adds each later one in place, in micro-batch
  order: ``((g₁ + g₂) + g₃)``.

``model`` is anything with ``forward(x, target) -> (loss, cache)``, ``backward(cache, dloss)
-> (grads, dx)``, ``params`` and ``step(grads)`` (manual.mlp.MLP); its optimizer must have a
settable ``lr`` (manual.optim).
"""
import torch

from manual.clip import clip_grad_norm


def micro_batch_seed(k, loss, scale=None):
    """dloss of ``loss / k``: the backward seed 1 divided by k, as div.Scalar's backward does.

    scale: a GradScaler's float32 scale S, for ``scaler.scale(loss / k).backward()``: the mul's
    backward passes 1·S = S (exact), then the division's S / k (one rounding)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"accumulate: expected an integer >= 1, got {k!r}")
    seed = torch.ones((), dtype=loss.dtype, device=loss.device) if scale is None \
        else scale.to(device=loss.device, dtype=loss.dtype)
    return seed / k


def accumulate_grads(total, grads):
    """AccumulateGrad over micro-batches: the first gradients as they are, later ones added.

    total: the running dict (None before the first micro-batch); grads: this micro-batch's.
    """
    if total is None:
        return dict(grads)
    if set(total) != set(grads):
        raise ValueError(f"grads: expected names {sorted(total)}, got {sorted(grads)}")
    return {name: total[name] + g for name, g in grads.items()}   # .grad += new, in place in torch


def accumulated_grads(model, batches):
    """Forward and backward over the micro-batches ``[(x, target), …]`` with each loss divided by
    k = len(batches).  -> (summed grads by name, [loss_i / k for each micro-batch])."""
    if not batches:
        raise ValueError("batches: expected at least one (x, target) micro-batch")
    total, losses = None, []
    for x, target in batches:
        loss, cache = model.forward(x, target)
        grads, _ = model.backward(cache, dloss=micro_batch_seed(len(batches), loss))
        total = accumulate_grads(total, grads)
        losses.append(loss / len(batches))
    return total, losses


def optimizer_step(model, batches, *, max_norm=None, norm_type=2.0, schedule=None, order=None):
    """One optimizer step over k micro-batches.  -> dict with ``losses`` (each loss_i / k),
    ``lr`` (the rate used, None without a schedule), ``total_norm`` and ``clip_coef`` (0-d
    tensors, None without clipping).

    max_norm: clip the summed gradients to this global norm (clip_grad_norm_ after the last
    backward, before the optimizer).  order: parameter names in the twin's ``parameters()``
    order, which the total norm stacks its per-tensor norms in (default: ``model.params``).
    schedule: a manual.schedules schedule; its rate is set on the optimizer before the update
    and it is stepped after it, as ``opt.step(); sched.step()``.
    """
    grads, losses = accumulated_grads(model, batches)
    total_norm = coef = None
    if max_norm is not None:
        names = list(order) if order is not None else list(model.params)
        grads, total_norm, coef = clip_grad_norm({n: grads[n] for n in names}, max_norm, norm_type)
    lr = None
    if schedule is not None:
        lr = model.optimizer.lr = schedule.lr
    model.step(grads)
    if schedule is not None:
        schedule.step()
    return {"losses": losses, "lr": lr, "total_norm": total_norm, "clip_coef": coef}
