"""A custom torch.autograd.Function whose backward is checked with refnet's public API.

With `backward_fn=None`, `refnet.check_backward` takes the gradients under test from autograd
through the Function (that is, from its hand-written `backward`), and the reference from
autograd through `reference`, the same math in stock torch ops.

Run it:  pytest docs/examples/custom_function.py     (tests/test_docs_examples.py runs it too)
"""
import torch

import refnet


class Swish(torch.autograd.Function):
    """swish(x) = x·σ(x) (SiLU), with its derivative written by hand."""

    @staticmethod
    def forward(ctx, x):
        s = torch.sigmoid(x)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, dout):
        x, s = ctx.saved_tensors
        return dout * (s * (1 + x * (1 - s)))      # swish' = σ + x·σ·(1 − σ)


class SwishWrong(Swish):
    @staticmethod
    def backward(ctx, dout):
        x, s = ctx.saved_tensors
        return dout * s                           # forgot the product rule's second term


def swish_reference(x):
    return x * torch.sigmoid(x)


def inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(7, 9, generator=gen, dtype=dtype) * 3]


def test_swish_backward_matches_autograd(refnet_check):
    report = refnet_check.check_backward(Swish.apply, inputs(), reference=swish_reference,
                                         tier="tolerance")
    print(report)
    assert report.forward.tier == "bitwise"                 # same forward ops, same bits
    assert report["dx"].tier in ("bitwise", "ulp", "tolerance")


def test_swish_in_float64_is_within_a_few_ulp():
    report = refnet.check_backward(Swish.apply, inputs(torch.float64), reference=swish_reference,
                                   tier="tolerance")
    assert report.passed and report["dx"].max_ulp < 1e3


def test_a_wrong_backward_fails_with_the_worst_element():
    report = refnet.check_backward(SwishWrong.apply, inputs(), reference=swish_reference)
    assert not report.passed and report["dx"].tier == "fail"
    text = "\n".join(refnet.describe(v) for v in report.failures())
    assert "worst at index" in text and "max ulp" in text and "elements differ" in text
