"""The textbook backwards (CS231n / llm.c style, a few plain ops) graded against the bit-exact ones.

manual/ keeps both for batch norm, layer norm and cross-entropy: the textbook form a lecture
writes, and the kernel-shaped form that is bit-identical to autograd (tested elsewhere against
autograd).  Here the textbook form is held to the tolerance tier with stated bounds, and shown
not to be bitwise: the order of the sums and the FMAs decide the last bits.  u is the unit
roundoff (2⁻²⁴ float32, 2⁻⁵³ float64).  Bounds (measured worst, 5 seeds × 5 shapes × 2 dtypes,
torch 2.13 CPU: dx ≤ 4.6, sums ≤ 1.8, cross-entropy ≤ 1.6 of the unit below):
    dx (norms)        |Δ| ≤ 16·u·(|w|/σ)·max|dy|   (batch norm: per feature over the batch;
                                                      layer norm: σ per row, max over the row)
    dweight, dbias    |Δ| ≤ 4·N·u·Σₙ|term|          (term dy·x̂, dy: the recursive-sum bound)
    cross-entropy     |Δ| ≤ 4·u/N
"""
import pytest
import torch

from manual import losses, norm

DTYPES = (torch.float32, torch.float64)
SHAPES = ((2, 3), (8, 5), (16, 20), (64, 33), (100, 257))


def _u(dtype):
    return torch.finfo(dtype).eps / 2


def _inputs(n, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    x, dy, w, b, running_mean = draw(n, d) * 3 + 1, draw(n, d), draw(d), draw(d), draw(d)
    running_var = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    return [t.to(dtype) for t in (x, dy, w, b, running_mean, running_var)]


def _within(name, got, exact, bound):
    excess = ((got - exact).abs() - bound).max().item()
    assert excess <= 0, f"{name}: |textbook − bit-exact| exceeds the stated bound by {excess:.3g}"


def _grade_norm(textbook, exact, dout, xhat, x_scale):
    n, u = dout.shape[0], _u(dout.dtype)
    _within("dx", textbook[0], exact[0], 16 * u * x_scale)
    _within("dweight", textbook[1], exact[1], 4 * n * u * (dout * xhat).abs().sum(0))
    _within("dbias", textbook[2], exact[2], 4 * n * u * dout.abs().sum(0))
    return sum(int((t != e).sum()) for t, e in zip(textbook, exact))


def _norm_case(kind, n, d, dtype, seed):
    """(textbook grads, bit-exact grads, dout, x̂, the dx scale) for one norm on one input."""
    x, dy, w, b, rm, rv = _inputs(n, d, dtype, seed)
    if kind == "layernorm":
        _, cache = norm.layernorm_forward(x, w, b)
        invstd, mean = cache.invstd.unsqueeze(1), cache.mean.unsqueeze(1)
        x_scale = invstd * (dy * w).abs().amax(1, keepdim=True)           # per row
        backwards = norm.layernorm_backward_textbook, norm.layernorm_backward
    else:
        _, cache = norm.batchnorm_forward(x, w, b, rm, rv, training=kind == "batchnorm_train")
        invstd, mean = cache.invstd, cache.mean
        x_scale = w.abs() * invstd * dy.abs().amax(0)                     # per feature
        backwards = norm.batchnorm_backward_textbook, norm.batchnorm_backward
    textbook, exact = (backward(dy, cache) for backward in backwards)
    return textbook, exact, dy, (x - mean) * invstd, x_scale.expand_as(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["batchnorm_train", "batchnorm_eval", "layernorm"])
def test_norm_textbook_within_bounds_and_not_bitwise(kind, dtype):
    differing = 0
    for seed, (n, d) in enumerate(SHAPES):
        differing += _grade_norm(*_norm_case(kind, n, d, dtype, seed))
    assert differing > 0, f"the textbook {kind} backward came out bitwise"


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_textbook_within_bounds_and_not_bitwise(dtype):
    differing = 0
    for seed, (n, c) in enumerate(SHAPES):
        gen = torch.Generator().manual_seed(seed)
        y = (3 * torch.randn(n, c, generator=gen, dtype=torch.float64)).to(dtype)
        labels = torch.randint(0, c, (n,), generator=gen)
        _, cache = losses.cross_entropy_forward(y, labels)
        dloss = torch.ones((), dtype=dtype)
        textbook = losses.cross_entropy_backward_textbook(dloss, cache)
        exact = losses.cross_entropy_backward(dloss, cache)
        _within("dy_pred", textbook, exact, 4 * _u(dtype) / n)
        differing += int((textbook != exact).sum())
    assert differing > 0, "the textbook cross-entropy backward came out bitwise"


def test_the_bounds_can_fail():
    """A textbook backward with a wrong term (x̂·Σ(dx̂·x̂) dropped) is caught by the dx bound."""
    x, dy, w, b, rm, rv = _inputs(16, 20, torch.float64, 0)
    _, cache = norm.layernorm_forward(x, w, b)
    rstd = cache.invstd.unsqueeze(1)
    dxhat = dy * w
    wrong = rstd * (dxhat - dxhat.mean(1, keepdim=True))
    x_scale = (rstd * dxhat.abs().amax(1, keepdim=True)).expand_as(x)
    with pytest.raises(AssertionError, match="exceeds the stated bound"):
        _within("dx", wrong, norm.layernorm_backward(dy, cache)[0], 16 * _u(x.dtype) * x_scale)
