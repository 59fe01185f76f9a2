"""Issue 22: check_backward and compare must not pass a wrong backward.

Each test here failed on the code before the fix (a false pass) and passes after:
- the default dout equalled the user's seed-0 input, so a transposed square dW and a ReLU mask
  taken from dout passed (at bitwise, and with fd=True);
- the absolute floor atol = 1e-6 let a float32 gradient near convergence be all zeros or half
  its value and still pass `tolerance`.
tests/test_false_passes_property.py draws shapes, dtypes, seeds and scales and injects the bugs.
"""
import pytest
import torch
import torch.nn.functional as F

import refnet


def affine(x, w, b):
    return x @ w + b


def affine_backward_transposed(dout, x, w, b):
    return dout @ w.T, dout.T @ x, dout.sum(0)          # dW = doutᵀ·x: wrong unless x == dout


def relu_backward_mask_from_dout(dout, x):
    return torch.where(dout > 0, dout, torch.zeros_like(dout))   # mask from dout, not x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fd", [False, True])
def test_seed0_square_affine_with_dw_transposed_fails(dtype, fd):
    torch.manual_seed(0)                                 # the common idiom in user tests
    x, w, b = torch.randn(4, 4, dtype=dtype), torch.randn(4, 4, dtype=dtype), torch.randn(4, dtype=dtype)
    report = refnet.check_backward(affine, [x, w, b], affine_backward_transposed, tier="tolerance",
                                   fd=fd)
    assert not report.passed and report["dw"].tier == "fail", str(report)
    if fd:
        assert not report.fd["dw (finite differences)"].passed


@pytest.mark.parametrize("fd", [False, True])
def test_relu_mask_taken_from_dout_fails(fd):
    gen = torch.Generator().manual_seed(0)              # docs/examples/cs231n_layers.py's data
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    report = refnet.check_backward(torch.relu, [x], relu_backward_mask_from_dout, fd=fd)
    assert not report.passed and report["dinput0"].tier == "fail", str(report)


def test_default_dout_is_not_the_users_seeded_draw():
    for seed in range(4):
        torch.manual_seed(seed)
        x = torch.randn(5, 5, dtype=torch.float64)
        seen = []
        report = refnet.check_backward(lambda x: x * 1.0, [x],
                                       lambda dout, x: seen.append(dout) or dout)
        assert report.passed and len(seen) == 2          # two douts, drawn differently
        for d in seen:
            assert not torch.equal(d, x) and not torch.equal(d, x.T)
        assert not torch.equal(seen[0].abs() >= 0.5, torch.ones_like(x, dtype=torch.bool))
        assert bool((seen[1].abs() >= 0.5).all())        # the second law: |dout| in [0.5, 1.5)


def test_a_dout_tied_to_an_input_is_redrawn():
    # an input that happens to equal (or be proportional to, or the transpose of) refnet's own
    # first draw: the guard redraws rather than let the dout coincide with it
    from refnet import backward_check
    gen = torch.Generator().manual_seed(backward_check._DOUT_SEEDS[0] % 2 ** 63)
    first = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    for x in (first, 3 * first, first.T.contiguous()):
        seen = []
        refnet.check_backward(lambda x: x * 1.0, [x], lambda dout, x: seen.append(dout) or dout)
        assert all(not torch.equal(d, first) for d in seen)


def mse_head(n=32768, seed=0):
    """An MSE regression head near convergence in float32: residuals ~1e-3."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n, generator=gen)
    pred = y + 1e-3 * torch.randn(n, generator=gen)
    return pred, y


def mse(pred, y):
    return ((pred - y) ** 2).mean()


@pytest.mark.parametrize("bug", ["zeros", "forgot the 2"])
@pytest.mark.parametrize("tier", ["bitwise", "ulp", "tolerance"])
def test_small_mse_gradient_zeroed_or_halved_fails_every_tier(bug, tier):
    pred, y = mse_head()

    def backward(dout, pred, y):
        g = dout * 2 * (pred - y) / pred.numel()
        return torch.zeros_like(g) if bug == "zeros" else g / 2

    report = refnet.check_backward(mse, [pred, y], backward, wrt=[0], tier=tier)
    assert report["dpred"].tier == "fail" and not report.passed, str(report)


def test_small_mse_gradient_right_passes():
    pred, y = mse_head()
    report = refnet.check_backward(mse, [pred, y],
                                   lambda dout, pred, y: dout * 2 * (pred - y) / pred.numel(),
                                   wrt=[0])
    assert report.passed, str(report)


@pytest.mark.parametrize("factor", [0.0, 0.5, 2.0, -1.0, 1.01])
@pytest.mark.parametrize("size", [1e-9, 1e-4, 1.0, 1e4])
def test_compare_never_passes_a_constant_factor_or_zeros(factor, size):
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        ref = torch.randn(7, 3, generator=gen, dtype=dtype) * size
        assert refnet.compare(ref * factor, ref).tier == "fail"


def test_compare_tolerance_counts_elements_beyond_it():
    ref = torch.linspace(1, 2, 528)
    act = ref * (1 + 1e-6)                               # rounding-level noise everywhere...
    act[:9] = -act[:9]                                   # ...and 9 really wrong elements
    v = refnet.compare(act, ref)
    assert v.tier == "fail" and v.beyond_tolerance == 9 and v.mismatched > 9
    assert "9 beyond tolerance" in v.message()
