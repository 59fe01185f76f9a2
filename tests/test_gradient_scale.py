"""A gradient that is mathematically zero (a bias in front of batch norm) is rounding noise of the
size of the backward's other gradients.  Where a check is graded at tolerance (CUDA), two noisy
answers must pass against each other, while a gradient off by a factor must still fail: the
manual-vs-autograd checks grade with one scale per backward (refnet.compare.scaled_atol)."""
import torch

from refnet import harness
from refnet.data import load_data
from refnet.examples import Context
from refnet.examples._common import twin_check
from refnet.spec import Spec


def _noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1e-9


def test_twin_check_grades_a_zero_gradient_against_its_backwards_scale():
    weight = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    manual = {"dW": weight.clone(), "db": _noise(4, 2)}
    twin = {"dW": weight.clone(), "db": _noise(4, 3)}
    check = twin_check("grad", manual, twin, Context(dtype=torch.float32))
    assert check.verdicts[1].tier == "tolerance" and check.verdicts[1].passed
    manual["dW"] = weight * 1.01                       # a wrong factor still fails
    assert not twin_check("grad", manual, twin, Context(dtype=torch.float32)).verdicts[0].passed


def test_gradient_checks_grade_the_bias_before_batch_norm_at_the_backwards_scale():
    spec = Spec.from_dict({"sizes": [3, 6, 2], "activation": "tanh", "loss": "mse",
                           "norm": "batchnorm", "data": "random", "n_samples": 8,
                           "optimizer": {"name": "sgd", "lr": 0.1}, "dtype": "float32"})
    pair = harness.build_pair(spec)
    x, y = load_data(spec)
    backward = pair.mlp.backward

    def noisy(cache):   # the bias gradient in front of batch norm: other rounding noise
        grads, dx = backward(cache)
        grads = dict(grads)
        grads["layers.0.bias"] = _noise(grads["layers.0.bias"].shape, 4)
        return grads, dx

    pair.mlp.backward = noisy
    verdicts = {v.name: v for v in harness.gradient_checks(pair, x, y)}
    bias = verdicts["layers.0.bias.grad"]
    assert bias.tier == "tolerance" and bias.passed, bias.message()

