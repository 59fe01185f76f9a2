"""refnet.check_training leaves the caller's pair as plain lockstep training would (issue 26,
item 7).

Its gradient check at a step runs an extra manual forward/backward and a twin forward/backward.
Neither may move anything in the caller's pair: batch norm's running statistics (and
num_batches_tracked), any other buffer, a dropout stream, the optimizer state, the twin's
gradients or the global generator.  The pair after check_training is compared, piece by piece and
bitwise, with a second pair built from the same spec and trained by `train_lockstep` alone.
"""
import pytest
import torch

import refnet
from refnet import data as datasets
from refnet import harness


def _bits(t):
    return (t.dtype, tuple(t.shape), t.detach().cpu().contiguous().reshape(-1).view(torch.uint8))


def _flatten(prefix, obj, out):
    """Every tensor and plain value in nested dicts/lists, under a dotted name."""
    if isinstance(obj, dict):
        for k in obj:
            _flatten(f"{prefix}.{k}", obj[k], out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(f"{prefix}[{i}]", v, out)
    else:
        out[prefix] = obj
    return out


def _state(pair):
    """Every piece of state in a pair (and the global generator), by name."""
    mlp, twin = pair.mlp, pair.twin
    state = {"manual.training": mlp.training, "twin.training": twin.training,
             "global_rng": torch.get_rng_state(),
             "manual.generator": mlp.generator.get_state() if mlp.generator is not None else None,
             "twin.rng": getattr(twin, "_rng_state", None)}
    _flatten("manual.params", mlp.params, state)
    _flatten("manual.buffers", getattr(mlp, "buffers", {}), state)
    _flatten("manual.optimizer", mlp.optimizer.state_dict(), state)
    _flatten("twin.state_dict", dict(twin.state_dict(keep_vars=False)), state)
    _flatten("twin.grad", {n: p.grad for n, p in twin.named_parameters()}, state)
    _flatten("twin.optimizer", pair.twin_opt.state_dict(), state)
    return state


def _differences(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    out = []
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            same = _bits(x)[:2] == _bits(y)[:2] and torch.equal(_bits(x)[2], _bits(y)[2])
        else:
            same = type(x) is type(y) and x == y
        if not same:
            out.append(name)
    return out


SPECS = {
    "batchnorm-adam": {"sizes": [2, 6, 5, 3], "activation": "relu", "norm": "batchnorm",
                       "loss": "cross_entropy", "data": "spiral", "n_samples": 30,
                       "batch_size": 10, "steps": 7,
                       "optimizer": {"name": "adam", "lr": 0.01, "amsgrad": True}},
    "batchnorm-momentum": {"sizes": [2, 6, 1], "activation": "tanh", "norm": "batchnorm",
                           "data": "xor", "n_samples": 24, "batch_size": 8, "steps": 6,
                           "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
    "layernorm-adamw": {"sizes": [2, 6, 3], "activation": "elu", "norm": "layernorm",
                        "loss": "cross_entropy", "data": "spiral", "n_samples": 30,
                        "batch_size": 10, "steps": 5,
                        "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1}},
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_check_training_leaves_the_callers_pair_as_plain_training_would(name):
    spec = refnet.Spec.from_dict({**SPECS[name], "dtype": "float64"})
    x, target = datasets.load_data(spec)
    pair, plain = harness.build_pair(spec), harness.build_pair(spec)
    assert _differences(_state(pair), _state(plain)) == []       # the copy taken before
    # a gradient check at every step: the most extra forwards check_training ever runs
    result = refnet.check_training(spec, pair=pair, data=(x, target), check_every=1)
    assert result.verdict == "identical", result.message
    assert len(result.grad_checks) == spec.steps
    harness.train_lockstep(plain, x, target, spec.steps, spec.batch_size, spec.seed)
    after, expected = _state(pair), _state(plain)
    diff = _differences(after, expected)
    assert diff == [], f"check_training moved the caller's {diff}"
    if spec.norm == "batchnorm":     # the statistics were compared, and training moved them
        moved = [k for k in after if k.startswith("manual.buffers.") and "running_mean" in k]
        assert moved and not torch.equal(after[moved[0]], torch.zeros_like(after[moved[0]]))
