"""refnet.oracles.fd: central differences, kinks (counted, never a false failure), and that the finite
difference oracle catches a wrong backward that autograd's twin does not share."""
import re

import pytest
import torch

import manual.activations as acts
from refnet.compare import ORACLE_CENTRAL_DIFFERENCES
from refnet.oracles.fd import FDSettings, _loss, fd_checks, numeric_gradient, rel_error
from refnet.spec import Spec


def counts(check):
    m = re.search(r"(\d+) coordinates, (\d+) at a kink \((\d+) accepted between the one-sided "
                  r"differences, (\d+) by the frozen-piece", check.note)
    return tuple(int(g) for g in m.groups())


def test_numeric_gradient_and_rel_error():
    x = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64)
    g = numeric_gradient(lambda: (x ** 3).sum(), x)
    assert rel_error(3 * x ** 2, g).max() < 1e-8
    with pytest.raises(TypeError, match="x: finite differences run in float64"):
        numeric_gradient(lambda: x, x.float())


def test_smooth_spec_passes_with_stated_thresholds():
    fd, gc = fd_checks(Spec(sizes=[3, 5, 4, 2], activation=["tanh", "sigmoid"], n_samples=6))
    assert fd.passed and gc.passed and fd.tier == "tolerance"
    assert fd.oracle == ORACLE_CENTRAL_DIFFERENCES
    total, kinks, _, _ = counts(fd)
    assert kinks == 0 and total == sum(v.numel for v in fd.verdicts)
    assert "rel_error <= 1e-06" in fd.note and "h 1e-06" in fd.note
    assert [v.name for v in fd.verdicts][-1] == "input.grad"


def test_sampling_caps_coordinates_per_tensor():
    fd, _ = fd_checks(Spec(sizes=[40, 30, 2], n_samples=4), settings=FDSettings(per_tensor=10))
    weight = fd.verdicts[0]
    assert weight.name == "layers.0.weight.grad" and weight.numel == 10
    assert "10/1200 coordinates sampled" in weight.note


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "maxout"])
def test_kinks_are_detected_counted_and_accepted(activation):
    # XOR without bias: the row (0, 0) puts every pre-activation exactly at 0 (ReLU's kink, a
    # Maxout tie), so perturbing that row's inputs straddles the kink.
    spec = Spec(sizes=[2, 8, 8, 3], activation=activation, bias=False, data="xor", slope=0.2)
    fd, gc = fd_checks(spec)
    assert fd.passed and gc.passed, "\n".join(fd.failures() + gc.failures())
    _, kinks, bracket, frozen = counts(fd)
    assert kinks > 0 and kinks == bracket + frozen
    assert f"({kinks} kink coordinates skipped)" in gc.note


def test_frozen_piece_accepts_pytorch_convention_outside_the_bracket():
    # Maxout ties (all pieces 0 at the (0,0) row): the analytic gradient takes the first piece,
    # which need not lie between the one-sided differences once several units add up.
    _, kinks, bracket, frozen = counts(fd_checks(Spec(sizes=[2, 8, 8, 3], activation="maxout",
                                                      bias=False, data="xor"))[0])
    assert frozen > 0


def test_float32_spec_is_rebuilt_in_float64():
    fd, gc = fd_checks(Spec(sizes=[2, 4, 1], dtype="float32", data="xor"))
    assert fd.passed and "spec is float32; rebuilt in float64" in fd.note
    assert all(v.dtype == "float64" for v in fd.verdicts)


def test_wrong_backward_fails_finite_differences_not_gradcheck(monkeypatch):
    fwd, _, opts = acts.ACTIVATIONS["tanh"]
    monkeypatch.setitem(acts.ACTIVATIONS, "tanh", (fwd, lambda dy, y: dy * (1 - y * y) * 1.01, opts))
    fd, gc = fd_checks(Spec(sizes=[3, 5, 2], activation="tanh", n_samples=4))
    assert not fd.passed and fd.tier == "fail" and gc.passed
    bad = fd.verdicts[0]
    assert bad.name == "layers.0.weight.grad" and bad.mismatched > 0
    msg = bad.message()
    for fragment in ("layers.0.weight.grad", "shape [5, 3] float64 on cpu", "tier fail",
                     "max abs diff", "max rel diff", "worst at index [",
                     "sampled coordinates miss the threshold"):
        assert fragment in msg
    assert abs(bad.worst_values[0] / bad.worst_values[1] - 1.01) < 1e-6


def test_svm_hinge_pieces_match_multimarginloss():
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 4, (7,), generator=gen)
    loss, mask = _loss("svm", out, target, None)
    assert torch.allclose(loss, torch.nn.MultiMarginLoss()(out, target), rtol=1e-15, atol=0)
    assert not mask.gather(1, target.unsqueeze(1)).any()  # the target class is never a piece
    moved = out + 10 * (torch.arange(4) == 0)   # class 0's margins all turn positive
    frozen, _ = _loss("svm", moved, target, mask)
    natural, _ = _loss("svm", moved, target, None)
    assert frozen < natural  # frozen pieces keep the hinge pattern they froze


def test_a_wrong_value_at_a_kink_fails(monkeypatch):
    # ReLU'(0) = 3: no subgradient.  On the XOR row (0, 0) without bias every pre-activation is
    # exactly 0, so only that row's input coordinates see it, and every one of them is at a kink:
    # neither the bracket of one-sided differences nor the frozen piece (ReLU'(0) = 0) accepts it.
    def forward(x):
        return torch.relu(x), x

    def backward(dout, x):
        return torch.where(x > 0, dout, torch.where(x == 0, 3 * dout, 0.0))

    monkeypatch.setitem(acts.ACTIVATIONS, "relu", (forward, backward, ()))
    fd, _ = fd_checks(Spec(sizes=[2, 8, 8, 3], activation="relu", bias=False, data="xor"))
    _, kinks, bracket, frozen = counts(fd)
    failed = [v for v in fd.verdicts if not v.passed]
    assert [v.name for v in failed] == ["input.grad"] and not fd.passed
    assert kinks > bracket + frozen and failed[0].mismatched == kinks - bracket - frozen
    assert failed[0].worst_index[0] == 0   # the row (0, 0)
