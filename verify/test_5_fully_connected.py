"""Section 5: deep fully connected ReLU nets, and the collapse of stacked linear layers."""
import torch

from refnet.examples import deep as D
from verify._examples import assert_all, run


def test_deep_fc(device, dtype, refnet_check):
    checks = run("deep_fc", device, dtype)
    assert_all(checks, device, refnet_check)
    for label in D.DEEP_SIZES:
        assert checks[f"{label}.loss_curve[{D.DEEP_STEPS}]"].verdicts[0].steps == D.DEEP_STEPS
        if device == "cpu":
            assert checks[f"{label}.loss_curve[{D.DEEP_STEPS}]"].verdicts[0].identical_steps == D.DEEP_STEPS
        if dtype == torch.float64:
            assert checks[f"{label}.fd"].passed


def test_linear_collapse(device, dtype, refnet_check):
    checks = run("linear_collapse", device, dtype)
    assert_all(checks, device, refnet_check)
    assert checks["collapse"].tier in ("bitwise", "ulp", "tolerance")
