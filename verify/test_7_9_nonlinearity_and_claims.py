"""Sections 7 and 9: XOR and circles with and without a nonlinearity; width and capacity sweeps."""
import pytest

from verify._examples import assert_all, run


@pytest.mark.parametrize("name", ["xor", "circles", "width_sweep", "capacity_gap"])
def test_claims(name, device, dtype, refnet_check):
    checks = run(name, device, dtype)
    assert_all(checks, device, refnet_check)
    claims = [c for c in checks.values() if c.oracle == "measured claim"]
    assert claims and all(c.passed for c in claims)
    if device == "cpu":
        for c in checks.values():
            if "loss_curve" in c.name:
                v = c.verdicts[0]
                assert v.identical_steps == v.steps, c.name
