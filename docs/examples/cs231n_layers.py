"""CS231n's affine / ReLU / softmax-loss layers written by hand, checked with refnet's public API.

Each layer is a forward returning (out, cache) and a backward(dout, cache) returning the gradients
of its inputs — the assignment's shape.  `refnet.check_backward` runs the forward under autograd
for the reference gradients, runs the hand-written backward, and grades each gradient.

Run it:  pytest docs/examples/cs231n_layers.py     (tests/test_docs_examples.py runs it too)
Shapes: x (N, D), w (D, M), b (M,), scores (N, C), labels y (N,).
"""
import torch
import torch.nn.functional as F

import refnet


def affine_forward(x, w, b):
    """x (N, D), w (D, M), b (M,) -> out (N, M), cache."""
    return x @ w + b, (x, w)


def affine_backward(dout, cache):
    """dout (N, M) -> dx (N, D), dw (D, M), db (M,)."""
    x, w = cache
    dx = dout @ w.T          # out = x·w + b:  dx = dout·wᵀ
    dw = x.T @ dout          # dw = xᵀ·dout
    db = dout.sum(0)         # b is broadcast over the batch: sum dout over it
    return dx, dw, db


def relu_forward(x):
    return x.clamp_min(0), x


def relu_backward(dout, x):
    # relu'(x) = 1 where x > 0, else 0.  torch.where, not dout * (x > 0): the product gives −0.0
    # where dout < 0, and PyTorch's threshold_backward gives +0.0 (0 ulp apart, but not bitwise).
    return torch.where(x > 0, dout, torch.zeros_like(dout))


def softmax_loss(scores, y):
    """scores (N, C), labels y (N,) -> (mean cross-entropy loss, dscores (N, C))."""
    shifted = scores - scores.max(1, keepdim=True).values
    log_probs = shifted - shifted.exp().sum(1, keepdim=True).log()
    n = scores.shape[0]
    loss = -log_probs[torch.arange(n), y].mean()
    dscores = log_probs.exp()                  # d loss / d scores = (softmax − onehot(y)) / N
    dscores[torch.arange(n), y] -= 1
    return loss, dscores / n


def data(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, generator=gen, dtype=dtype)
    w = torch.randn(5, 4, generator=gen, dtype=dtype)
    b = torch.randn(4, generator=gen, dtype=dtype)
    y = torch.randint(0, 4, (6,), generator=gen)
    return x, w, b, y


def test_affine_is_bitwise():
    x, w, b, _ = data()
    report = refnet.check_backward(affine_forward, [x, w, b], affine_backward, tier="bitwise")
    print(report)
    assert [v.name for v in report] == ["dx", "dw", "db"]
    report.assert_ok()


def test_relu_is_bitwise_with_where(refnet_check):
    x, *_ = data()
    # (out, x): two arrays, so say that the second is the cache
    refnet_check.check_backward(relu_forward, [x], relu_backward, tier="bitwise",
                                returns="out_cache")


def test_relu_as_a_product_is_ulp_not_bitwise():
    # The mask product is mathematically right; refnet says how far it is from PyTorch's bits.
    x, *_ = data()
    report = refnet.check_backward(relu_forward, [x], lambda dout, x: dout * (x > 0), tier="ulp",
                                   returns="out_cache")
    assert report["dx"].tier == "ulp" and report["dx"].max_ulp == 0     # −0.0 against +0.0


def test_softmax_loss_against_cross_entropy():
    x, w, b, y = data()
    scores = x @ w + b
    # check_backward differentiates every floating tensor input: here the scores (y is labels).
    report = refnet.check_backward(
        lambda scores, y: softmax_loss(scores, y)[0], [scores, y],
        lambda dout, scores, y: dout * softmax_loss(scores, y)[1],
        reference=F.cross_entropy, tier="tolerance", fd=True)
    print(report)
    report.assert_ok()
    assert report["dscores"].tier in ("bitwise", "ulp", "tolerance")


def two_layer_loss(x, w1, b1, w2, b2, y):
    h, c1 = affine_forward(x, w1, b1)
    a, c2 = relu_forward(h)
    scores, c3 = affine_forward(a, w2, b2)
    loss, dscores = softmax_loss(scores, y)
    return loss, (c1, c2, c3, dscores)


def two_layer_backward(dout, cache):
    c1, c2, c3, dscores = cache
    da, dw2, db2 = affine_backward(dout * dscores, c3)
    dh = relu_backward(da, c2)
    dx, dw1, db1 = affine_backward(dh, c1)
    return dx, dw1, db1, dw2, db2


def test_two_layer_net_with_finite_differences(refnet_check):
    gen = torch.Generator().manual_seed(1)
    x, w1, b1 = (torch.randn(s, generator=gen, dtype=torch.float64) for s in [(6, 5), (5, 7), (7,)])
    w2, b2 = torch.randn(7, 3, generator=gen, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    report = refnet_check.check_backward(two_layer_loss, [x, w1, b1, w2, b2, y],
                                         two_layer_backward, tier="tolerance", fd=True)
    assert [v.name for v in report] == ["dx", "dw1", "db1", "dw2", "db2"]
    assert report.fd.passed


def test_a_wrong_db_is_caught_not_broadcast():
    # db kept as (1, M): torch's `cmp` idioms would broadcast it against b.grad (M,) and pass.
    x, w, b, _ = data()

    def backward_keepdim(dout, cache):
        dx, dw, _ = affine_backward(dout, cache)
        return dx, dw, dout.sum(0, keepdim=True)

    report = refnet.check_backward(affine_forward, [x, w, b], backward_keepdim)
    assert not report.passed and report["db"].tier == "fail"
    assert "shape [1, 4] vs [4]" in report["db"].note and "never broadcasts" in report["db"].note
