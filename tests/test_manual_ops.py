"""Each manual op's backward against central finite differences in float64, and shape checks."""
import pytest
import torch

import manual
from manual import activations as A
from manual import layers
from refnet.oracles.fd import numeric_gradient, rel_error

F64 = torch.float64


def rand(*shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=F64) * scale


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_finite_differences(bias):
    x, w, b = rand(5, 7, seed=1), rand(3, 7, seed=2), rand(3, seed=3) if bias else None
    dout = rand(5, 3, seed=4)
    out, cache = manual.linear_forward(x, w, b)
    dx, dw, db = manual.linear_backward(dout, cache)
    f = lambda: manual.linear_forward(x, w, b)[0]  # noqa: E731
    assert rel_error(dx, numeric_gradient(f, x, dout)).max() < 1e-8
    assert rel_error(dw, numeric_gradient(f, w, dout)).max() < 1e-8
    if bias:
        assert rel_error(db, numeric_gradient(f, b, dout)).max() < 1e-8
    else:
        assert db is None


def test_linear_column_major_input():
    x = rand(7, 5, seed=1).t()  # column-major (5, 7)
    w, dout = rand(3, 7, seed=2), rand(5, 3, seed=4)
    _, cache = manual.linear_forward(x, w)
    dx, _, _ = manual.linear_backward(dout, cache)
    assert torch.allclose(dx, dout @ w)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "relu", "leaky_relu", "elu", "identity", "maxout"])
def test_activation_matches_finite_differences(name):
    x = rand(6, 8, seed=5)
    x[x.abs() < 1e-3] += 0.01  # keep away from kinks: a central difference there means nothing
    y, cache = manual.activation_forward(name, x)
    dy = rand(*y.shape, seed=6)
    dx = manual.activation_backward(name, dy, cache)
    num = numeric_gradient(lambda: manual.activation_forward(name, x)[0].clone(), x, dy)
    assert dx.shape == x.shape
    assert rel_error(dx, num).max() < 1e-7


@pytest.mark.parametrize("name", ["sum_squared", "mse"])
def test_loss_matches_finite_differences(name):
    y, t = rand(4, 3, seed=7), rand(4, 3, seed=8)
    loss, cache = manual.loss_forward(name, y, t)
    dy = manual.loss_backward(name, torch.ones((), dtype=F64), cache)
    num = numeric_gradient(lambda: manual.loss_forward(name, y, t)[0], y)
    assert rel_error(dy, num).max() < 1e-8


def test_mlp_backward_matches_finite_differences():
    sizes = [5, 7, 6, 3]
    params = manual.mlp.init_params(sizes, ["tanh", "sigmoid"], True, seed=3)
    mlp = manual.MLP(params, ["tanh", "sigmoid"], "sum_squared")
    x, t = rand(4, 5, seed=9), rand(4, 3, seed=10)
    loss, cache = mlp.forward(x, t)
    grads, dx = mlp.backward(cache)
    f = lambda: mlp.forward(x, t)[0]  # noqa: E731
    for name, p in params.items():
        assert rel_error(grads[name], numeric_gradient(f, p)).max() < 1e-6, name
    assert rel_error(dx, numeric_gradient(f, x)).max() < 1e-6


def test_sgd_update_is_fused_multiply_add():
    """p ← p − lr·g as torch.optim.SGD does it (one FMA), which two roundings would not match."""
    p0 = rand(1000, seed=11).float()
    g = rand(1000, seed=12).float()
    p = p0.clone()
    manual.make_optimizer("sgd", lr=0.1).step({"w": p}, {"w": g})
    ref = torch.nn.Parameter(p0.clone())
    ref.grad = g.clone()
    torch.optim.SGD([ref], lr=0.1).step()
    assert torch.equal(p, ref.detach())
    assert not torch.equal(p, p0 - 0.1 * g)  # the unfused update rounds differently somewhere


def test_relu_backward_gives_positive_zero_and_passes_inf():
    y, _ = A.relu_forward(torch.tensor([-1.0, 0.0, 2.0]))
    dx = A.relu_backward(torch.tensor([-3.0, -3.0, float("inf")]), y)
    assert dx.tolist() == [0.0, 0.0, float("inf")]
    assert not torch.signbit(dx[:2]).any()


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="x: expected shape"):
        layers.linear_forward(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="bias: expected shape"):
        layers.linear_forward(torch.zeros(2, 5), torch.zeros(4, 5), torch.zeros(3))
    with pytest.raises(TypeError, match="weight: expected dtype"):
        layers.linear_forward(torch.zeros(2, 5), torch.zeros(4, 5, dtype=F64))
    with pytest.raises(ValueError, match="target: expected shape"):
        manual.loss_forward("sum_squared", torch.zeros(2, 3), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="activation: unknown name 'swish'"):
        manual.activation_forward("swish", torch.zeros(2))


# ELU at the kink: x = 0 takes the negative branch, dx = dout·α·e⁰ = dout·α (PyTorch's
# elu_backward: x <= 0).  With α = 1 both branches give dout, so a port taking the positive
# branch at 0 passes every α = 1 test; α ≠ 1 tells them apart.
def _elu_kink_input(dtype):
    x = torch.linspace(-2.0, 2.0, 37, dtype=torch.float64).to(dtype)
    x[[0, 5, 18, 33, 36]] = 0.0       # zeros in the vector lanes and in the scalar tail
    x[7] = -0.0
    return x


@pytest.mark.parametrize("alpha", [0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_elu_kink_takes_the_negative_branch_bitwise(alpha, dtype):
    x = _elu_kink_input(dtype)
    dout = torch.linspace(0.3, 1.7, 37, dtype=torch.float64).to(dtype)
    y, cache = A.elu_forward(x, alpha)
    dx = A.elu_backward(dout, cache)
    xt = x.clone().requires_grad_()
    yt = torch.nn.ELU(alpha)(xt)
    yt.backward(dout)
    assert torch.equal(y, yt.detach())
    same_bits = dx.view(torch.int32 if dtype == torch.float32 else torch.int64) == \
        xt.grad.view(torch.int32 if dtype == torch.float32 else torch.int64)
    assert bool(same_bits.all()), f"bits differ at {same_bits.logical_not().nonzero().flatten().tolist()}"
    kink = x == 0
    assert torch.equal(dx[kink], dout[kink] * alpha)          # dout·α·e⁰, the negative branch
    assert not torch.equal(dx[kink], dout[kink])              # the positive branch would be dout
