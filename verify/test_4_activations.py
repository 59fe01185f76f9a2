"""Section 4: the six activations — grid (kinks, |x| to 1e4, NaN, ±Inf), inside an MLP, FD."""
import torch

from refnet.examples import activations as A
from verify._examples import assert_all, run


def test_activations(device, dtype, refnet_check):
    checks = run("activations", device, dtype)
    assert_all(checks, device, refnet_check)
    for name in A.ACTIVATIONS:
        assert f"{name}.grid" in checks and f"{name}.mlp" in checks
        if dtype == torch.float64:
            assert f"{name}.fd" in checks


def test_kink_derivatives_are_the_documents(device, dtype):
    for name, want in A.KINK_DOC.items():
        zero = torch.zeros(1, dtype=dtype, device=device)
        _, d0 = A.manual_pair(name, zero, torch.ones_like(zero))
        assert d0.item() == torch.tensor(want, dtype=dtype).item(), name


def test_grid_has_the_hard_values():
    x = A.grid(torch.float64, "cpu")
    assert torch.isnan(x).any() and torch.isposinf(x).any() and torch.isneginf(x).any()
    assert (x == 0).any() and float(x[torch.isfinite(x)].abs().max()) >= 1e4
