"""Grade a lockstep training run of refnet's MLP: identical, rounds differently, or wrong gradient.

`check_training` is exported as `refnet.check_training`; the rule it applies is written in
docs/check-api.md ("Curves of implementations that round differently").
"""
from dataclasses import dataclass

import torch

from refnet import data as datasets
from refnet import harness
from refnet import twin as twin_mod
from refnet.api import Report, compare, describe
from refnet.compare import DEFAULT_TIER, TIERS, Verdict, compare_curves, required_tier


@dataclass
class TrainingCheck:
    """What check_training found.  verdict: "identical", "rounds differently" or "wrong gradient".

    grad_checks: (step, Report) at each checked step: the manual gradients against the twin's,
        both computed from the SAME parameters (the manual side's at that step) and batch, so a
        tier here measures the gradient, not the drift of the trajectory.
    curve: the loss-curve verdict (first step the curves part, identical steps).
    growth: (step, max |Δloss|, max |Δloss| / max(|loss_manual|, |loss_twin|)) over the steps
        since the previous check (up to and including `step`).
    """
    verdict: str
    passed: bool
    required: str
    curve: Verdict
    grad_checks: list
    growth: list
    message: str

    def __bool__(self):
        return self.passed

    def __str__(self):
        return self.message


def check_training(spec, *, pair=None, data=None, steps=None, check_every=None,
                   tier=DEFAULT_TIER):
    """Train a spec's manual MLP and its autograd twin in lockstep and grade honestly.

    Two implementations that round differently (e.g. tanh's backward as dout·(1 − y·y) instead
    of PyTorch's fused form) agree to an ulp at step 0 but part over a long run: training
    amplifies every difference.  That is not a wrong gradient.  So at every `check_every`-th
    step the gradients are compared from the same parameters and batch, and:

      identical           the loss curves are bitwise equal
      rounds differently  every checked gradient meets `tier` but the curves part: reported with
                          the step they part and how |Δloss| grows; passed
      wrong gradient      a checked gradient fails `tier` (a wrong backward fails at step 0)

    spec: a refnet.Spec; pair: a Pair from build_pair (default build_pair(spec)); its `.mlp` may
    be any object with forward/backward/train_step/params like manual.mlp.MLP.
    data: (x, target) (default load_data(spec)).  steps: default spec.steps.
    check_every: default max(1, steps // 10).

    >>> import refnet
    >>> spec = refnet.Spec.from_dict({"sizes": [2, 8, 1], "activation": "tanh", "data": "xor",
    ...                               "dtype": "float32", "steps": 20})
    >>> refnet.check_training(spec).verdict
    'identical'
    """
    required = required_tier(tier)
    pair = pair or harness.build_pair(spec)
    x, target = data if data is not None else datasets.load_data(spec)
    steps = spec.steps if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    check_every = max(1, steps // 10) if check_every is None else check_every
    if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 1:
        raise ValueError(f"check_every: expected an integer >= 1, got {check_every!r}")
    if getattr(spec, "dropout", 0):
        raise ValueError("spec: check_training does not support dropout (its gradient check at a "
                         "step runs an extra forward, which would draw other masks)")
    if getattr(spec, "accumulate", 1) > 1:
        raise ValueError("accumulate: check_training checks the gradients of one batch per step; "
                         "it does not support micro-batches (use refnet.train or verify --spec)")
    scratch = harness.build_pair(spec)     # its twin: the reference gradients at checked steps
    grad_checks = []

    def check_at(step, xb, tb):
        if step % check_every == 0 or step == steps - 1:
            grad_checks.append((step, _grads_at(pair.mlp, scratch, xb, tb, required, step)))

    lm, lt = harness.train_lockstep(pair, x, target, steps, spec.batch_size, spec.seed,
                                    before_step=check_at)
    # |Δloss| and |Δloss| / max(|loss|) per step (on the host once), their peak per window
    diff = (lm.double() - lt.double()).abs().cpu()
    rel = torch.where(diff == 0, 0.0, diff / torch.maximum(lm.double().abs(), lt.double().abs()).cpu())
    growth, begin = [], 0
    for step, _ in grad_checks:
        growth.append((step, float(diff[begin:step + 1].max()), float(rel[begin:step + 1].max())))
        begin = step + 1
    curve = compare_curves("loss_curve", lm, lt, tier=required)
    worst = max((r.tier for _, r in grad_checks), key=TIERS.index)
    tiers = ", ".join(f"{s}: {r.tier}" for s, r in grad_checks)
    wrong = next(((s, r) for s, r in grad_checks if not r.passed), None)
    if wrong is not None:
        s, r = wrong
        bad = next(v for v in r if not v.passed)
        verdict, passed = "wrong gradient", False
        message = (f"wrong gradient: at step {s} {bad.name} is {bad.tier!r} from the same "
                   f"parameters (required {required!r}); gradient tier by step: {tiers}\n"
                   + describe(bad, required))
    elif curve.first_divergence is None:
        verdict, passed = "identical", True
        message = (f"identical: {steps} steps, loss curves bitwise; gradient tier by step: "
                   f"{tiers}")
    else:
        verdict, passed = "rounds differently", True
        first = curve.first_divergence
        d0 = abs(curve.divergence_values[0] - curve.divergence_values[1])
        peak_step, peak_abs, peak = max(growth, key=lambda g: g[2])
        message = (f"rounds differently: gradients agree at {worst!r} or better at every checked "
                   f"step ({tiers}), but the loss curves part at step {first} (|dloss| {d0:.3g}); "
                   f"the relative difference peaks at {peak:.3g} (|dloss| {peak_abs:.3g}, up to step "
                   f"{peak_step}) and is "
                   f"{growth[-1][2]:.3g} at the end; {curve.identical_steps}/{curve.steps} steps "
                   f"identical, curve tier {curve.tier!r}. Expected when training amplifies "
                   f"rounding (chaotic dynamics), not a wrong gradient. Largest |dloss| / max(|loss|) "
                   f"up to each checked step: " + ", ".join(f"{s}: {r:.3g}" for s, _, r in growth))
    return TrainingCheck(verdict, passed, required, curve, grad_checks, growth, message)


def _grads_at(mlp, scratch, xb, tb, required, step):
    """The manual gradients against the scratch twin's, both from the manual parameters (and
    running statistics) now; the manual side's running statistics are left as they were."""
    buffers = {name: b.clone() for name, b in getattr(mlp, "buffers", {}).items()}
    twin_mod.load_params(scratch.twin, mlp.params)
    twin_mod.load_buffers(scratch.twin, buffers)
    loss_m, cache = mlp.forward(xb, tb)
    grads_m, _ = mlp.backward(cache)
    for name, b in buffers.items():      # the extra forward must not advance the statistics
        mlp.buffers[name].copy_(b)
    scratch.twin.zero_grad(set_to_none=True)
    loss_t = scratch.twin_loss(scratch.twin(xb), tb)
    loss_t.backward()
    grads_t = twin_mod.grads_of(scratch.twin)
    report = Report([compare(loss_m.detach(), loss_t.detach(), name="loss", tier=required,
                             kind="forward")], required=required, title=f"step {step}")
    report.extend(compare(grads_m[n], grads_t[n], name=f"{n}.grad", tier=required)
                  for n in grads_m)
    return report
