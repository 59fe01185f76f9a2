"""The spec keys of the training step: clip_grad_norm, accumulate, lr_schedule, blocks —
defaults, normalization and one-line errors."""
import pytest

from refnet.spec import Spec

BASE = {"sizes": [2, 16, 3], "steps": 20}


def test_keys_default_off_and_normalize():
    s = Spec.from_dict(BASE)
    assert (s.clip_grad_norm, s.accumulate, s.lr_schedule, s.blocks) == (None, 1, None, None)
    s = Spec.from_dict({**BASE, "clip_grad_norm": {"max_norm": 1}, "accumulate": 3,
                        "lr_schedule": {"name": "warmup_cosine", "warmup_steps": 5, "min_lr": 1e-4},
                        "blocks": {"n": 2, "width": 16, "hidden": 32}})
    assert s.clip_grad_norm == {"max_norm": 1.0, "norm_type": 2}
    assert s.blocks == {"n": 2, "width": 16, "hidden": 32, "norm": "layer", "activation": "relu"}
    assert Spec.from_dict(s.to_dict()) == s          # round-trips through JSON's form
    inf = Spec.from_dict({**BASE, "clip_grad_norm": {"max_norm": 0.5, "norm_type": "inf"}})
    assert inf.clip_grad_norm["norm_type"] == "inf"


@pytest.mark.parametrize("extra,message", [
    ({"clip_grad_norm": {"max_norm": 0}}, "clip_grad_norm.max_norm: expected a finite number > 0"),
    ({"clip_grad_norm": {"max_norm": -2.5}}, "clip_grad_norm.max_norm"),
    ({"clip_grad_norm": {"max_norm": 1, "norm_type": 1}}, 'clip_grad_norm.norm_type: expected 2 or "inf"'),
    ({"clip_grad_norm": {"max_norm": 1, "foreach": True}}, "clip_grad_norm.foreach: unknown setting"),
    ({"clip_grad_norm": 1.0}, "clip_grad_norm: expected an object with 'max_norm'"),
    ({"lr_schedule": {"name": "linear"}}, "lr_schedule.name: unknown schedule 'linear'"),
    ({"lr_schedule": {"name": "warmup_cosine", "warmup_steps": 25}},
     r"lr_schedule.warmup_steps: the warm-up \(25 steps\) must be shorter than the run \(20 steps\)"),
    ({"accumulate": 0}, "accumulate: expected an integer >= 1, got 0"),
    ({"accumulate": 1.5}, "accumulate: expected an integer >= 1"),
    ({"blocks": {"n": 1, "width": 8, "hidden": 4}}, "blocks.width: 8 must equal"),
    ({"blocks": {"n": 0, "width": 16, "hidden": 4}}, "blocks.n: expected an integer >= 1"),
    ({"blocks": {"n": 1, "width": 16, "hidden": 4, "norm": "batch"}}, "blocks.norm: expected 'layer' or null"),
    ({"blocks": {"n": 1, "width": 16, "hidden": 4, "activation": "maxout"}}, "blocks.activation: maxout"),
    ({"blocks": {"n": 1, "width": 16, "hidden": 4, "activation": "swish"}},
     "blocks.activation: unknown name 'swish'"),
    ({"blocks": {"n": 1, "width": 16, "hidden": 4, "activation": ["relu"]}},
     "blocks.activation: expected one activation name"),
    ({"blocks": {"n": 1, "width": 16, "hidden": 4, "dropout": 0.1}}, "blocks.dropout: unknown setting"),
])
def test_bad_step_keys_one_line(extra, message):
    with pytest.raises(ValueError, match=message) as info:
        Spec.from_dict({**BASE, **extra})
    assert "\n" not in str(info.value)


def test_blocks_need_a_hidden_layer():
    with pytest.raises(ValueError, match="blocks.width"):
        Spec.from_dict({"sizes": [16, 3], "blocks": {"n": 1, "width": 16, "hidden": 4}})
