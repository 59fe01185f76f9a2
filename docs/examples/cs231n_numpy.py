"""CS231n-style layers in NumPy, checked unmodified against torch references.

The layers are written here in the assignment's shape: `layer_forward(...) -> (out, cache)` and
`layer_backward(dout, cache) -> gradients`, NumPy only.  `refnet.check_backward` takes them as
they are: NumPy inputs mean NumPy functions, converted at the boundary with their dtypes kept
(float32 stays float32), and `reference=` is the same layer in torch ops, whose autograd
gradients are the reference.  A backward named `(dout, cache)` says the forward returns
`(out, cache)`.

Run it:  pytest docs/examples/cs231n_numpy.py     (tests/test_docs_examples.py runs it too)
"""
import numpy as np
import torch
import torch.nn.functional as F

import refnet


# --- the layers (NumPy, CS231n's shape) ----------------------------------------------------------
def affine_forward(x, w, b):
    out = x.reshape(x.shape[0], -1).dot(w) + b
    cache = (x, w, b)
    return out, cache


def affine_backward(dout, cache):
    x, w, b = cache
    dx = dout.dot(w.T).reshape(x.shape)                 # out = x·w + b
    dw = x.reshape(x.shape[0], -1).T.dot(dout)
    db = dout.sum(axis=0)
    return dx, dw, db


def relu_forward(x):
    out = np.maximum(0, x)
    cache = x
    return out, cache


def relu_backward(dout, cache):
    x = cache
    return dout * (x > 0)                               # relu' = 1 where x > 0


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    """Training mode: batch mean and (biased) batch variance."""
    mu = x.mean(axis=0)
    xc = x - mu
    var = (xc ** 2).mean(axis=0)
    std = np.sqrt(var + eps)
    xhat = xc / std
    out = gamma * xhat + beta
    cache = (xhat, gamma, std)
    return out, cache


def batchnorm_backward(dout, cache):
    xhat, gamma, std = cache
    n = dout.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    dxhat = dout * gamma
    # the compact form: dx = (n·dxhat − Σdxhat − xhat·Σ(dxhat·xhat)) / (n·std)
    dx = (n * dxhat - dxhat.sum(axis=0) - xhat * (dxhat * xhat).sum(axis=0)) / (n * std)
    return dx, dgamma, dbeta


def dropout_forward(x, mask):
    """Inverted dropout with a given mask (already divided by the keep probability)."""
    out = x * mask
    cache = mask
    return out, cache


def dropout_backward(dout, cache):
    mask = cache
    return dout * mask


def softmax_loss(x, y):
    """(loss, dx): the assignment's loss layer returns its gradient directly."""
    shifted = x - x.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = x.shape[0]
    loss = -log_probs[np.arange(n), y].mean()
    dx = np.exp(log_probs)
    dx[np.arange(n), y] -= 1
    return loss, dx / n


# --- torch references (stock ops: autograd gives the reference gradients) ----------------------
def affine_ref(x, w, b):
    return x.reshape(x.shape[0], -1) @ w + b


def batchnorm_ref(x, gamma, beta):
    return F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5)


def dropout_ref(x, mask):
    return x * mask


# --- the checks ------------------------------------------------------------------------------------
def data(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6, 5)).astype(dtype)
    w = rng.standard_normal((5, 4)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    return x, w, b


def test_affine_against_torch_in_float64_and_float32():
    for dtype in (np.float64, np.float32):
        report = refnet.check_backward(affine_forward, list(data(dtype)), affine_backward,
                                       reference=affine_ref, tier="tolerance")
        print(report)        # NumPy's dot and torch's matmul round differently: not bitwise
        assert [v.name for v in report] == ["dx", "dw", "db"]
        assert report.forward.dtype == np.dtype(dtype).name          # dtypes kept
        report.assert_ok()


def test_relu_with_finite_differences():
    x = data()[0]
    report = refnet.check_backward(relu_forward, [x], relu_backward, reference=torch.relu,
                                   fd=True, tier="ulp")
    report.assert_ok()


def test_batchnorm_against_torch():
    x = data()[0] * 3 + 2
    gamma, beta = np.linspace(0.5, 1.5, 5), np.linspace(-1, 1, 5)
    report = refnet.check_backward(batchnorm_forward, [x, gamma, beta], batchnorm_backward,
                                   reference=batchnorm_ref, tier="tolerance", fd=True)
    print(report)
    report.assert_ok()
    assert [v.name for v in report] == ["dx", "dgamma", "dbeta"]


def test_float32_dropout_keeps_float32():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 10)).astype(np.float32)
    p = 0.7                                               # keep probability
    mask = (rng.random(x.shape) < p) / p                  # float64, as the assignment draws it
    report = refnet.check_backward(dropout_forward, [x, mask.astype(np.float32)],
                                   dropout_backward, reference=dropout_ref, wrt=[0],
                                   tier="bitwise")
    report.assert_ok()
    # the assignment's float64 mask promotes the output to float64: refnet casts it back to the
    # input's float32 at the boundary and says so in the verdict, instead of failing on dtype
    report = refnet.check_backward(dropout_forward, [x, mask], dropout_backward,
                                   reference=lambda x, m: x * m.float(), wrt=[0], tier="ulp")
    report.assert_ok()
    assert "NumPy returned float64 for float32" in report["dx"].note


def test_softmax_loss_against_cross_entropy():
    rng = np.random.default_rng(2)
    scores, y = rng.standard_normal((7, 4)), rng.integers(0, 4, 7)
    report = refnet.check_backward(lambda x, y: softmax_loss(x, y)[0], [scores, y],
                                   lambda dout, x, y: dout * softmax_loss(x, y)[1],
                                   reference=F.cross_entropy, tier="tolerance", fd=True)
    report.assert_ok()


def test_a_wrong_numpy_backward_fails():
    def affine_backward_transposed(dout, cache):      # dw from dout and x swapped
        dx, dw, db = affine_backward(dout, cache)
        x, w, b = cache
        return dx, dout.T.dot(x).T if dw.shape[0] == dw.shape[1] else dw * 2, db

    report = refnet.check_backward(affine_forward, list(data()), affine_backward_transposed,
                                   reference=affine_ref)
    assert not report.passed and report["dw"].tier == "fail"
