"""Sections 7 and 9: XOR and circles with and without a nonlinearity; width and capacity sweeps."""
import math

import pytest

from refnet.compare import CLAIM
from refnet.examples import claims as C

from verify._examples import assert_all, run


@pytest.mark.parametrize("name", ["xor", "circles", "width_sweep", "capacity_gap"])
def test_claims(name, device, dtype, refnet_check):
    checks = run(name, device, dtype)
    assert_all(checks, device, refnet_check)
    claims = [c for c in checks.values() if c.oracle == CLAIM]
    assert claims and all(c.passed for c in claims)
    for c in claims:   # their own verdict kind, with the figures measured
        assert c.kind == "claim" and c.tier == "holds" and c.figures, c.name
        assert all(math.isfinite(v) for v in c.figures.values()), (c.name, c.figures)
    if name == "capacity_gap":   # the claim is what the figures say, step by step
        gap = checks["gap_grows_with_width"].figures
        ladder = [gap[f"gap_{n}"] for n in C.GAP_LADDER]
        assert all(a < b for a, b in zip(ladder, ladder[1:])), gap
        train = checks["train_error_falls"].figures
        falls = [train[f"train_{n}"] for n in C.CAPACITY]
        assert all(a > b for a, b in zip(falls, falls[1:])), train
    if name in ("xor", "circles"):   # every model trained: no NaN step, finite accuracy figures
        assert "finite (True)" in checks["linear_accuracy"].note
    if device == "cpu":
        for c in checks.values():
            if "loss_curve" in c.name:
                v = c.verdicts[0]
                assert v.identical_steps == v.steps, c.name
