"""Training demos beyond the document: CS231n's three-class spiral and a random regression.

Each is one MLP on a generated data set, sized and tuned so that `refnet train --example NAME`
learns (spiral: ≥ 95 % train accuracy, measured on CPU float64; see tests/test_train.py).
`refnet verify --example NAME` checks the same net: gradients at init, then the whole training
run's loss curve and final parameters, manual vs autograd.  Not part of the main job (section
None): run them by name.
"""
from refnet.examples import register
from refnet.data import load_data
from refnet.harness import twin_checks
from refnet.spec import Spec


def spiral_spec(dtype="float64", device="cpu"):
    """2-64-64-3 ReLU, softmax cross-entropy, Adam, mini-batches of 64, 1500 steps."""
    return Spec(sizes=[2, 64, 64, 3], activation="relu", loss="cross_entropy", data="spiral",
                n_samples=300, batch_size=64, steps=1500, optimizer={"name": "adam", "lr": 0.01},
                dtype=dtype, device=device, name="spiral")


def random_spec(dtype="float64", device="cpu"):
    """10-32-5 tanh on random regression targets, SGD with momentum, 500 steps."""
    return Spec(sizes=[10, 32, 5], activation="tanh", loss="mse", data="random", n_samples=64,
                steps=500, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, dtype=dtype,
                device=device, name="random")


def spec_run(make_spec):
    """run(ctx) for an example that is one spec: gradients at init, the training run's loss curve
    (the spec's batch schedule) and final parameters."""
    def run(ctx):
        spec = make_spec(ctx.dtype_name, ctx.device)
        x, target = load_data(spec)
        return twin_checks(spec, x, target, ctx.strict_bits)
    return run


register("spiral", "CS231n's 3-class spiral, 2-64-64-3 relu, softmax cross-entropy, Adam, "
         "mini-batches of 64", None, spec=spiral_spec)(spec_run(spiral_spec))
register("random", "random regression, 10-32-5 tanh", None, spec=random_spec)(
    spec_run(random_spec))
