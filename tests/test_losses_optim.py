"""Losses and optimizers of manual/: finite differences, stability, the SVM's scale, settings."""
import math

import pytest
import torch

import manual
from manual import losses
from manual.mlp import MLP, init_params
from refnet import not_bitwise
from refnet.oracles.fd import rel_error
from refnet.spec import Spec

F = torch.nn.functional


def _scores_and_target(loss, n=7, c=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2
    if losses.target_kind(loss) == "labels":
        t = torch.randint(0, c, (n,), generator=gen)
    else:
        t = torch.randn(n, c, generator=gen, dtype=torch.float64)
    return y, t


def numeric_gradient(f, x, h=1e-3):
    """Five-point central differences of the scalar f() in x (float64, x perturbed in place):
    (−f(x+2h) + 8f(x+h) − 8f(x−h) + f(x−2h)) / 12h, truncation O(h⁴), so that a relative error of
    1e-8 is reachable on every element (the 3-point rule stalls near 1e-7 on small entries)."""
    flat = x.view(-1)
    grad = torch.empty_like(flat)
    for i in range(flat.numel()):
        old = flat[i].item()
        vals = []
        for k in (2, 1, -1, -2):
            flat[i] = old + k * h
            vals.append(float(f()))
        flat[i] = old
        grad[i] = (-vals[0] + 8 * vals[1] - 8 * vals[2] + vals[3]) / (12 * h)
    return grad.view_as(x)


@pytest.mark.parametrize("loss", list(manual.LOSSES))
def test_loss_gradient_matches_finite_differences(loss):
    y, t = _scores_and_target(loss)
    _, cache = manual.loss_forward(loss, y, t)
    dy = manual.loss_backward(loss, torch.ones((), dtype=torch.float64), cache)
    numeric = numeric_gradient(lambda: manual.loss_forward(loss, y, t)[0], y)
    # the hinge has kinks at margin 0; the seeded scores stay well away from them
    assert float(rel_error(dy, numeric).max()) < 1e-8


def test_two_layer_relu_softmax_cross_entropy_finite_differences():
    """The classic check: two-layer ReLU net, softmax cross-entropy, L2 reg, float64, rel < 1e-8."""
    params = init_params([4, 6, 3], "relu", scheme="randn", seed=4, dtype=torch.float64)
    mlp = MLP(params, "relu", "cross_entropy", reg=0.05)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2, 0])
    _, cache = mlp.forward(x, labels)
    grads, dx = mlp.backward(cache)
    assert all(bool((g != 0).all()) for g in grads.values())  # no dead unit hides a gradient
    worst = 0.0
    for name, p in params.items():
        numeric = numeric_gradient(lambda: mlp.forward(x, labels)[0], p)
        worst = max(worst, float(rel_error(grads[name], numeric).max()))
    numeric_x = numeric_gradient(lambda: mlp.forward(x, labels)[0], x)
    worst = max(worst, float(rel_error(dx, numeric_x).max()))
    assert worst < 1e-8, f"max relative error {worst:.3g}"


def test_regularization_term_and_its_gradient():
    params = init_params([3, 4, 2], "tanh", seed=1, dtype=torch.float64)
    plain = MLP({k: v.clone() for k, v in params.items()}, "tanh", "mse")
    reg = MLP({k: v.clone() for k, v in params.items()}, "tanh", "mse", reg=0.1)
    x, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    l0, c0 = plain.forward(x, t)
    l1, c1 = reg.forward(x, t)
    expected = 0.1 * sum(float((params[f"layers.{i}.weight"] ** 2).sum()) for i in range(2))
    assert math.isclose(float(l1 - l0), expected, rel_tol=1e-12)
    g0, g1 = plain.backward(c0)[0], reg.backward(c1)[0]
    for name in params:
        extra = 0.2 * params[name] if name.endswith("weight") else torch.zeros_like(params[name])
        torch.testing.assert_close(g1[name] - g0[name], extra, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_is_stable_for_huge_logits(dtype):
    y = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [1e4, 1e4, -1e4]], dtype=dtype)
    t = torch.tensor([0, 1, 2])
    loss, cache = losses.cross_entropy_forward(y, t)
    dy = losses.cross_entropy_backward(torch.ones((), dtype=dtype), cache)
    assert torch.isfinite(loss) and torch.isfinite(dy).all()
    yt = y.clone().requires_grad_()
    ref = F.cross_entropy(yt, t)
    ref.backward()
    assert torch.equal(loss, ref.detach()) and torch.equal(dy, yt.grad)
    # row 1 is wrong by 2e4 nats; rows 0 and 2 cost 0 and log 2 + 2e4
    assert math.isclose(float(loss), (2e4 + (2e4 + math.log(2))) / 3, rel_tol=1e-6)


def test_kernel_exp_is_bitwise_with_the_log_softmax_backward_kernel():
    """The Sleef exp replica: probed through the kernel itself (row sum −1 ⇒ dx_j = exp(logp_j))."""
    if not_bitwise.applies("loss:cross_entropy"):
        pytest.skip("the kernel uses std::exp under ATEN_CPU_CAPABILITY=default")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        logp = torch.log_softmax(torch.randn(64, 37, generator=gen, dtype=torch.float64) * 6, 1).to(dtype)
        logp = torch.cat([logp, torch.full((1, 37), -120.0, dtype=dtype)])  # underflow region
        probe = torch.zeros_like(logp)
        probe[:, 0] = -1.0
        kernel = torch.ops.aten._log_softmax_backward_data(probe, logp, 1, dtype)[:, 1:]
        assert torch.equal(losses.log_softmax_backward_exp(logp)[:, 1:], kernel), dtype
        assert not torch.equal(torch.exp(logp)[:, 1:], kernel)  # the check can fail


def test_svm_is_cs231n_divided_by_classes():
    y, t = _scores_and_target("svm", n=6, c=4, seed=2)
    loss, _ = losses.svm_forward(y, t)
    correct = y.gather(1, t.unsqueeze(1))
    margins = (y - correct + 1).clamp_min(0)
    margins[torch.arange(6), t] = 0
    cs231n = margins.sum() / 6
    assert math.isclose(float(loss) * 4, float(cs231n), rel_tol=1e-14)


def test_label_losses_reject_bad_targets():
    y = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="target: expected int64"):
        manual.loss_forward("cross_entropy", y, torch.zeros(3))
    with pytest.raises(ValueError, match=r"target: expected shape \[3\]"):
        manual.loss_forward("svm", y, torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels in \[0, 3\]"):
        manual.loss_forward("svm", y, torch.tensor([0, 4, 1]))


@pytest.mark.parametrize("name, settings", [
    ("adam", {"lr": 3e-3, "betas": (0.7, 0.95), "eps": 1e-6, "weight_decay": 0.1}),
    ("adam", {"lr": 3e-3, "amsgrad": True}),
    ("adamw", {"lr": 3e-3, "weight_decay": 0.3, "amsgrad": True}),
    ("sgd", {"lr": 0.1, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.01}),
    ("sgd", {"lr": 0.1, "momentum": 0.8, "nesterov": True}),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optimizer_steps_are_bitwise_torch_optim(name, settings, dtype):
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(37, 19, generator=gen, dtype=torch.float64).to(dtype)
    ours = {"w": p0.clone()}
    theirs = torch.nn.Parameter(p0.clone())
    opt = manual.make_optimizer(name, **settings)
    ref = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name](
        [theirs], **settings, foreach=False)
    for step in range(25):
        g = torch.randn(37, 19, generator=gen, dtype=torch.float64).to(dtype) * (step + 1)
        opt.step(ours, {"w": g.clone()})
        theirs.grad = g.clone()
        ref.step()
        assert torch.equal(ours["w"], theirs.detach()), f"step {step}"


def test_optimizer_state_round_trips():
    gen = torch.Generator().manual_seed(6)
    p = {"w": torch.randn(4, 3, generator=gen, dtype=torch.float64)}
    grads = [{"w": torch.randn(4, 3, generator=gen, dtype=torch.float64)} for _ in range(4)]
    a = manual.make_optimizer("adam", lr=1e-2, amsgrad=True)
    for g in grads[:2]:
        a.step(p, g)
    b = manual.make_optimizer("adam", lr=1e-2, amsgrad=True)
    b.load_state_dict(a.state_dict())
    q = {"w": p["w"].clone()}
    for g in grads[2:]:
        a.step(p, g)
        b.step(q, g)
    assert torch.equal(p["w"], q["w"])


@pytest.mark.parametrize("optimizer, match", [
    ({"name": "adam", "momentum": 0.9}, "optimizer.momentum"),
    ({"name": "sgd", "betas": [0.9, 0.99]}, "optimizer.betas"),
    ({"name": "adam", "betas": [0.9]}, "optimizer.betas"),
    ({"name": "adam", "betas": [0.9, 1.0]}, r"optimizer.betas\[1\]"),
    ({"name": "adamw", "betas": [-0.1, 0.9]}, r"optimizer.betas\[0\]"),
    ({"name": "adam", "eps": 0.0}, "optimizer.eps"),
    ({"name": "adamw", "weight_decay": -1}, "optimizer.weight_decay"),
    ({"name": "adam", "lr": float("inf")}, "optimizer.lr"),
    ({"name": "sgd", "nesterov": True}, "optimizer.nesterov"),
])
def test_bad_optimizer_settings_name_the_key(optimizer, match):
    with pytest.raises(ValueError, match=match):
        Spec(sizes=[2, 3, 1], optimizer=optimizer)


@pytest.mark.parametrize("reg", [-1e-3, float("nan"), float("inf"), True, "0.1"])
def test_bad_reg_is_rejected(reg):
    with pytest.raises(ValueError, match="reg"):
        Spec(sizes=[2, 3, 1], reg=reg)


def test_spec_accepts_adam_with_pytorch_names():
    s = Spec(sizes=[2, 3, 2], loss="cross_entropy", reg=1e-4,
             optimizer={"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                        "weight_decay": 0.0, "amsgrad": False})
    assert s.reg == 1e-4 and Spec.from_dict(s.to_dict()) == s
