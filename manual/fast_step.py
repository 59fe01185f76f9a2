"""The step a training script runs (manual/step.py's ``optimizer_step``: k micro-batches, global-norm
clipping, the learning-rate schedule) over a FastMLP, with the same bits.

``FastStep(fast, accumulate=k, max_norm=…, norm_type=…, schedule=…, order=…).step(batches)``
returns what ``optimizer_step`` returns (``losses``, ``lr``, ``total_norm``, ``clip_coef``).

Specialised (``fallback`` None): one micro-batch (k = 1) on a specialised FastMLP.  The forward
and backward are the fast step's (``FastMLP.forward_backward``, gradients in its buffers); with
clipping, manual.clip.clip_grad_norm runs on those buffers in ``order`` (the twin's parameters()
order) and the update takes its clipped copies; the schedule's rate is set on the optimizer
before the update (the foreach update reads ``opt.lr`` on every call) and the schedule steps after
it, as ``opt.step(); sched.step()``.  A schedule alone also works under autocast (the step is
then FastMLP's autocast fallback).

Fallback (``fallback`` says why), the readable ``optimizer_step`` itself: k > 1 (the fast step
seeds its backward with 1, each micro-batch needs 1/k) and a FastMLP that is not specialised.
Accumulation or clipping under autocast is refused in one line: that step needs the GradScaler's
unscale before the clip and the seeds S/k, which manual.autocast.AutocastMLP.train_step runs (the
harness's path); FastStep has no scaler and does not wrap it.
"""
from manual.clip import check_norm_type, clip_grad_norm
from manual.fast import FastMLP
from manual.step import optimizer_step


class FastStep:
    """One optimizer step over k micro-batches with optional clipping and schedule (see the
    module docstring).  fast: a manual.fast.FastMLP; accumulate: k ≥ 1; max_norm: None or > 0;
    norm_type: 2 or "inf"; schedule: a manual.schedules schedule or None; order: parameter names
    in the twin's parameters() order for the total norm (default: the net's order)."""

    def __init__(self, fast, *, accumulate=1, max_norm=None, norm_type=2.0, schedule=None,
                 order=None):
        if not isinstance(fast, FastMLP):
            raise TypeError(f"fast: expected a manual.fast.FastMLP, got {type(fast).__name__}")
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate: expected an integer >= 1, got {accumulate!r}")
        self.norm_type = check_norm_type(norm_type)
        if fast.amp is not None and (accumulate > 1 or max_norm is not None):
            raise ValueError("fast: accumulation and clipping under autocast are not mirrored "
                             "here; use accumulate 1 and max_norm None with autocast")
        self.fast, self.k, self.max_norm = fast, accumulate, max_norm
        self.schedule = schedule
        self.order = list(order) if order is not None else list(fast.mlp.params)

    @property
    def fallback(self):
        """Why the step runs manual.step.optimizer_step (None: the specialised step)."""
        if self.k > 1:
            return (f"accumulate {self.k}: the fast step seeds its gradients with 1, each micro-batch "
                    f"needs 1/{self.k}; runs manual.step.optimizer_step")
        if self.fast.amp is None and self.fast.fallback is not None:
            return f"the net is not specialised ({self.fast.fallback}); runs manual.step.optimizer_step"
        return None

    def step(self, batches):
        """batches: [(x, target), …], k of them.  -> optimizer_step's dict."""
        if len(batches) != self.k:
            raise ValueError(f"batches: expected {self.k} micro-batches, got {len(batches)}")
        if self.fallback is not None:
            return optimizer_step(self.fast.mlp, batches, max_norm=self.max_norm,
                                  norm_type=self.norm_type, schedule=self.schedule,
                                  order=self.order)
        fast, opt = self.fast, self.fast.mlp.optimizer
        lr = None
        if self.schedule is not None:
            lr = opt.lr = self.schedule.lr
        (x, target), = batches
        if fast.amp is not None:
            loss = fast.train_step(x, target)
            total = coef = None
        else:
            loss, total, coef = self._fast_update(fast, x, target)
        if self.schedule is not None:
            self.schedule.step()
        return {"losses": [loss], "lr": lr, "total_norm": total, "clip_coef": coef}   # loss / 1

    def _fast_update(self, fast, x, target):
        """The fast forward/backward, [clipping], the foreach update.  -> (loss, norm, coef)."""
        loss = fast.forward_backward(x, target)
        total = coef = clipped = None
        if self.max_norm is not None:
            grads = fast.grads
            clipped, total, coef = clip_grad_norm({n: grads[n] for n in self.order},
                                                  self.max_norm, self.norm_type)
        fast.apply_update(clipped)           # the clipped copies are new tensors: free to overwrite
        return loss, total, coef
