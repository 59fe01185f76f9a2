"""Issue 22's property test: random shapes, dtypes, seeds and input scales, with a transposed
gradient, a missing or extra factor, a negated or zeroed gradient, or a ReLU mask taken from dout
injected into a correct backward; check_backward must never pass it.  Hypothesis is optional."""
import pytest
import torch

import refnet

# --- property test: random shapes, dtypes, seeds and scales; injected bugs never pass -------------
hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed: property "
                                 "test skipped")
from hypothesis import given, settings, strategies as st  # noqa: E402


def affine(x, w, b):
    return x @ w + b


def mse(pred, y):
    return ((pred - y) ** 2).mean()


def relu_backward_mask_from_dout(dout, x):
    return torch.where(dout > 0, dout, torch.zeros_like(dout))


def _relu_backward(dout, x):
    return torch.where(x > 0, dout, torch.zeros_like(dout))


def _affine_backward(dout, x, w, b):
    return dout @ w.T, x.T @ dout, dout.sum(0)


def _mse_backward(dout, pred, y):
    return dout * 2 * (pred - y) / pred.numel()


def _inject(bug, backward, k):
    """backward with bug applied to its k-th gradient."""
    def wrong(dout, *args):
        grads = backward(dout, *args)
        grads = list(grads) if isinstance(grads, tuple) else [grads]
        g = grads[k]
        if bug == "zero":
            g = torch.zeros_like(g)
        elif bug == "half":
            g = g / 2
        elif bug == "double":
            g = g * 2
        elif bug == "negate":
            g = -g
        elif bug == "transpose":
            g = g.T.contiguous()
        grads[k] = g
        return tuple(grads)
    return wrong


@settings(deadline=None, max_examples=60)
@given(st.sampled_from(["affine", "relu", "relu_mask_from_dout", "mse"]),
       st.sampled_from(["zero", "half", "double", "negate", "transpose"]),
       st.integers(2, 6), st.integers(2, 6), st.sampled_from([torch.float32, torch.float64]),
       st.integers(0, 2 ** 16), st.sampled_from([1e-6, 1e-3, 1.0, 1e3]), st.booleans())
def test_no_injected_bug_passes(op, bug, n, m, dtype, seed, size, user_seed_idiom):
    if user_seed_idiom:                                  # the user's torch.manual_seed(k); randn
        torch.manual_seed(seed % 4)
        draw = lambda *shape: torch.randn(*shape, dtype=dtype) * size   # noqa: E731
    else:
        gen = torch.Generator().manual_seed(seed)
        draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype) * size  # noqa: E731
    n = max(n, 3)
    if op == "affine":
        m = n if bug == "transpose" else m              # a transpose hides only when square
        fn, inputs, backward, k = affine, [draw(n, m), draw(m, m), draw(m)], _affine_backward, 1
    elif op == "mse":
        y = draw(n * m)
        fn, inputs, backward, k = mse, [y + 1e-3 * draw(n * m), y], _mse_backward, 0
    else:
        fn, inputs, backward, k = torch.relu, [draw(n, n)], _relu_backward, 0
    wrong = relu_backward_mask_from_dout if op == "relu_mask_from_dout" else \
        _inject(bug, backward, k)
    if bug == "transpose" and op in ("mse",):
        return                                           # a 1-D gradient has no transpose
    probe = torch.randn(fn(*inputs).shape, dtype=dtype, generator=torch.Generator().manual_seed(9))
    right, bad = backward(probe, *inputs), wrong(probe, *inputs)
    right = right if isinstance(right, tuple) else (right,)
    if all(torch.equal(a, b) for a, b in zip(right, bad)):
        return                          # the bug changes nothing here (a relu input all < 0, ...)
    report = refnet.check_backward(fn, inputs, wrong, wrt=[0] if op == "mse" else None,
                                   tier="tolerance")
    assert not report.passed, str(report)
