import math

import pytest
import torch

from refnet.compare import (ULP_LIMIT, Check, compare_curves, compare_tensors, count_tiers, meets,
                            tolerance, ulp_distance, unravel)
from refnet.portcheck import summary

F32, F64 = torch.float32, torch.float64


def nextafter(v, toward, dtype):
    return torch.nextafter(torch.tensor(v, dtype=dtype), torch.tensor(toward, dtype=dtype)).item()


@pytest.mark.parametrize("dtype", [F32, F64])
def test_ulp_one_step_and_zero(dtype):
    a = torch.tensor([1.0, 0.0, -0.0, 1.0], dtype=dtype)
    b = torch.tensor([nextafter(1.0, 2.0, dtype), -0.0, 0.0, 1.0], dtype=dtype)
    assert ulp_distance(a, b).tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [F32, F64])
def test_ulp_across_sign_counts_both_sides(dtype):
    tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # smallest subnormal
    a = torch.tensor([tiny, 2 * tiny], dtype=dtype)
    b = torch.tensor([-tiny, -tiny], dtype=dtype)
    assert ulp_distance(a, b).tolist() == [2.0, 3.0]


@pytest.mark.parametrize("dtype", [F32, F64])
def test_ulp_subnormal_to_normal_is_one_step(dtype):
    tiny = torch.finfo(dtype).tiny
    below = nextafter(tiny, 0.0, dtype)  # largest subnormal
    assert ulp_distance(torch.tensor([tiny], dtype=dtype), torch.tensor([below], dtype=dtype)).item() == 1


@pytest.mark.parametrize("dtype", [F32, F64])
def test_ulp_nan_and_inf(dtype):
    nan, inf = float("nan"), float("inf")
    a = torch.tensor([nan, nan, inf, inf, -inf, 1.0], dtype=dtype)
    b = torch.tensor([nan, 1.0, inf, -inf, torch.finfo(dtype).min, inf], dtype=dtype)
    d = ulp_distance(a, b).tolist()
    assert d[0] == 0 and d[2] == 0
    assert all(math.isinf(v) for v in (d[1], d[3], d[4], d[5]))


def test_ulp_extremes_do_not_overflow():
    a = torch.tensor([torch.finfo(F64).max], dtype=F64)
    b = torch.tensor([-torch.finfo(F64).max], dtype=F64)
    d = ulp_distance(a, b).item()
    assert math.isfinite(d) and d > 1e19


@pytest.mark.parametrize("dtype", [F32, F64])
def test_tier_boundaries(dtype):
    base = torch.linspace(1, 2, 10, dtype=dtype)
    assert compare_tensors("t", base, base.clone()).tier == "bitwise"
    k = ULP_LIMIT[dtype]
    at_limit = base.clone()
    at_limit[3] = base[3]
    for _ in range(k):
        at_limit[3] = torch.nextafter(at_limit[3], torch.tensor(10.0, dtype=dtype))
    v = compare_tensors("t", at_limit, base)
    assert (v.tier, v.max_ulp, v.mismatched, v.worst_index) == ("ulp", k, 1, [3])
    over = at_limit.clone()
    over[3] = torch.nextafter(over[3], torch.tensor(10.0, dtype=dtype))
    assert compare_tensors("t", over, base).tier == "tolerance"
    rtol, atol = tolerance(dtype, "grad")
    far = base.clone()
    far[7] = base[7] * (1 + 10 * rtol)
    v = compare_tensors("t", far, base)
    assert v.tier == "fail" and not v.passed and v.worst_index == [7]
    assert v.worst_values == [far[7].item(), base[7].item()]


def test_signed_zero_is_not_bitwise_but_zero_ulp():
    v = compare_tensors("t", torch.tensor([-0.0]), torch.tensor([0.0]))
    assert v.tier == "ulp" and v.max_ulp == 0 and v.mismatched == 1


def test_nan_same_position_agrees_and_is_reported():
    a = torch.tensor([1.0, float("nan")])
    v = compare_tensors("t", a, a.clone())
    assert v.tier == "bitwise" and v.nan_positions == 1 and "NaN" in v.note
    v = compare_tensors("t", torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, float("nan")]))
    assert v.tier == "fail"


def test_shape_and_dtype_must_match_never_broadcast():
    v = compare_tensors("layers.0.bias.grad", torch.zeros(64), torch.zeros(1, 64))
    assert v.tier == "fail" and "never broadcast" in v.message()
    assert compare_tensors("t", torch.zeros(3), torch.zeros(3, dtype=F64)).tier == "fail"


def test_strict_bits_and_required():
    a = torch.tensor([1.0])
    b = torch.tensor([nextafter(1.0, 2.0, F32)])
    assert compare_tensors("t", a, b).passed
    assert not compare_tensors("t", a, b, tier="bitwise").passed


def test_curve_first_divergence_and_message():
    a = torch.tensor([5.0, 4.0, 3.0, 2.0], dtype=F64)
    b = torch.tensor([5.0, 4.0, 3.5, 2.0], dtype=F64)
    v = compare_curves("loss_curve", a, b)
    assert (v.steps, v.identical_steps, v.first_divergence) == (4, 3, 2)
    assert v.divergence_values == [3.0, 3.5]
    msg = v.message()
    for part in ("loss_curve", "step 2", "actual 3.0 vs expected 3.5", "float64", "3/4 steps identical"):
        assert part in msg


def test_check_tier_is_its_worst_verdict_and_passes_only_when_all_do():
    a = torch.tensor([1.0, 2.0], dtype=F64)
    bitwise = compare_tensors("a", a, a.clone())
    off = compare_tensors("b", a, a + 1e-3)  # far outside tolerance: fail
    assert Check("both", [bitwise, off]).tier == "fail" and not Check("both", [bitwise, off]).passed
    assert Check("one", [bitwise]).tier == "bitwise" and Check("one", [bitwise]).passed
    assert Check("none", []).tier == "fail" and not Check("none", []).passed
    assert Check("both", [bitwise, off]).failures() == [off.message()]


def test_tier_counting_order_and_unravel():
    assert count_tiers(["bitwise", "tolerance", "bitwise", "fail"]) == \
        {"bitwise": 2, "tolerance": 1, "fail": 1}
    assert count_tiers([]) == {}
    assert meets("bitwise", "tolerance") and meets("ulp", "ulp") and not meets("tolerance", "ulp")
    with pytest.raises(ValueError):
        meets("bitwise", "exact")
    assert unravel(7, [2, 3, 4]) == [0, 1, 3] and unravel(23, [2, 3, 4]) == [1, 2, 3]


def test_port_check_summary_counts_tiers_and_finds_the_first_rows():
    rows = [{"case": "c", "name": n, "tier": t, "passed": p}
            for n, t, p in [("x", "bitwise", True), ("y", "ulp", True), ("z", "fail", False)]]
    s = summary(rows)
    assert s["tiers"] == {"bitwise": 1, "ulp": 1, "fail": 1} and (s["passed"], s["tensors"]) == (2, 3)
    assert s["first_differs"]["name"] == "y" and s["first_fails"]["name"] == "z"
    assert summary(rows[:1])["first_differs"] is None and summary([])["first_fails"] is None
