"""Autocast with gradient accumulation and clipping (issue 23 × issue 24): the stock script

    for each of k micro-batches:
        with torch.autocast("cpu", dtype): loss = criterion(model(x), y) / k
        scaler.scale(loss).backward()                  (no scaler: loss.backward())
    scaler.unscale_(opt); clip_grad_norm_(params, max_norm, norm_type)
    scaler.step(opt); scaler.update()                  (no scaler: opt.step())

against manual.autocast.AutocastMLP.train_step (each backward seeded with S / k, AccumulateGrad's
sum, GradScaler.unscale_ before manual.clip, the skip decided at unscale time), bit for bit at
every step: the loss, the total norm, the scale, the skip, and the final parameters.  The grid:
bfloat16 and float16 × k = 1, 2, 3 × clipping off / active / inactive × with and without a scaler
whose first scales overflow.
"""
import itertools

import pytest
import torch

from manual.grad_scaler import GradScaler
from refnet import harness
from refnet.data import load_data
from refnet.spec import Spec

STEPS = 12
# a scale that overflows for the first step(s), then backs off; growth by 1.5 makes later scales
# non-powers of two.  float16 overflows at 65504 (in the casts and the GEMMs); bfloat16 shares
# float32's range, so only a scale near 2^127 overflows, in the float32 loss backward
# (sum_squared: 2·(out − t)·S, inf once |out − t| ≥ 1) — hence that loss for bfloat16
OVERFLOWING = {"float16": {"init_scale": 2.0 ** 22, "growth_interval": 3, "growth_factor": 1.5},
               "bfloat16": {"init_scale": 2.0 ** 127, "growth_interval": 3, "growth_factor": 1.5,
                            "backoff_factor": 0.25}}
LOSS = {"float16": "cross_entropy", "bfloat16": "sum_squared"}
CLIPS = {"off": None, "active": {"max_norm": 0.02, "norm_type": 2},
         "active_inf": {"max_norm": 0.01, "norm_type": "inf"},
         "inactive": {"max_norm": 1e3, "norm_type": 2}}


def _spec(dtype, k, clip, scaler, activation="tanh", optimizer=None):
    return Spec(sizes=[2, 16, 16, 3], activation=activation, loss=LOSS[dtype], data="spiral",
                n_samples=120, batch_size=20, dtype="float32", seed=3, steps=STEPS,
                optimizer=optimizer or {"name": "adam", "lr": 1e-2}, autocast=dtype,
                accumulate=k, clip_grad_norm=CLIPS[clip],
                grad_scaler=OVERFLOWING[dtype] if scaler else None)


def run(spec):
    """Lockstep over spec.steps: (the failing verdicts' names, the StepOuts)."""
    x, target = load_data(spec)
    outs = []
    verdicts, _ = harness.curve_checks(harness.build_pair(spec), x, target, spec.steps,
                                       spec.batch_size, spec.seed, strict_bits=True, record=outs)
    assert {v.name for v in verdicts} >= {"loss_curve"} | (
        {"clip_norm_curve"} if spec.clip_grad_norm else set()) | (
        {"scale_curve", "skipped_steps"} if spec.grad_scaler else set())
    return [v.name for v in verdicts if not (v.passed and v.tier == "bitwise")], outs


@pytest.mark.parametrize("dtype, k, clip, scaler", [
    pytest.param(d, k, c, s, id=f"{d}-k{k}-clip_{c}-{'scaler' if s else 'plain'}")
    for d, k, c, s in itertools.product(("bfloat16", "float16"), (1, 2, 3), CLIPS, (False, True))
    if not (c == "active_inf" and k != 2)])
def test_accumulate_and_clip_under_autocast_bitwise(dtype, k, clip, scaler):
    failed, outs = run(_spec(dtype, k, clip, scaler))
    assert failed == [], failed
    skipped = [s for s, o in enumerate(outs) if not o.stepped_m]
    assert skipped == [s for s, o in enumerate(outs) if not o.stepped_t]
    if scaler:   # the overflow steps were skipped on both sides, and training went on after
        assert skipped[:1] == [0] and len(skipped) < STEPS, skipped
        assert all(not torch.isfinite(outs[s].norm_m) for s in skipped) if clip != "off" else True
    else:
        assert skipped == []
    clipped = [s for s, o in enumerate(outs) if o.clipped and o.stepped_m]
    if clip.startswith("active"):
        assert clipped, "the clip never bit"
    elif clip == "inactive":
        assert clipped == [] and all(bool(o.coef == 1) for o in outs if o.stepped_m)


def test_skip_is_decided_at_unscale_time_not_after_clipping():
    """The skip is the flag unscale_ recorded (torch records found_inf at unscale time; clipping
    an overflowed step leaves NaN·0 gradients, so a re-check would agree, but the flag is what
    torch's step reads), and step() after unscale_ does not unscale a second time."""
    scaler = GradScaler(init_scale=4.0)
    grads = {"w": torch.tensor([2.0, float("inf")]), "b": torch.tensor([8.0])}
    assert scaler.unscale_(grads) is True and grads["b"].item() == 2.0
    with pytest.raises(ValueError, match="unscale_: already called"):
        scaler.unscale_(grads)

    class Never:
        def step(self, params, grads):
            raise AssertionError("stepped after an overflow")
    cleaned = {"w": torch.zeros(2), "b": torch.zeros(1)}   # what a clip could leave: finite
    assert scaler.step(Never(), {}, cleaned) is False
    scaler.update()
    assert float(scaler.scale) == 2.0


def test_seed_is_scale_over_k():
    """scaler.scale(loss / k).backward() seeds S / k: one rounding of the float32 quotient."""
    from manual.step import micro_batch_seed
    loss = torch.tensor(0.5)
    s = torch.tensor(3.0 * 2 ** 20)
    assert micro_batch_seed(3, loss, s).item() == torch.tensor(3.0 * 2 ** 20 / 3).item()
    assert micro_batch_seed(1, loss, s).item() == s.item()
