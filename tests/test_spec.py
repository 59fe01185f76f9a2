import json

import pytest

from refnet.spec import Spec


def test_defaults_and_roundtrip(tmp_path):
    s = Spec(sizes=[2, 4, 1])
    assert s.activation == "sigmoid" and s.optimizer == {"name": "sgd", "lr": 0.01}  # MLP's and Twin's default too
    path = tmp_path / "s.json"
    path.write_text(json.dumps(s.to_dict()))
    assert Spec.from_json(str(path)) == s


@pytest.mark.parametrize("raw, exc, match", [
    ({"sizes": [2]}, ValueError, "sizes"),
    ({"sizes": [2, 0, 1]}, ValueError, "sizes: expected every width"),
    ({"sizes": [2, 3, 1], "activation": "swish"}, ValueError, "activation: unknown name 'swish'"),
    ({"sizes": [2, 3, 3, 1], "activation": ["tanh"]}, ValueError, "activation: expected"),
    ({"sizes": [2, 3, 1], "loss": "hinge2"}, ValueError, "loss: unknown"),
    ({"sizes": [2, 3, 1], "optimizer": {"name": "rmsprop"}}, ValueError, "optimizer.name"),
    ({"sizes": [2, 3, 1], "optimizer": {"name": "sgd", "lr": -1}}, ValueError, "lr"),
    ({"sizes": [2, 3, 1], "optimizer": {"name": "sgd", "lr": float("nan")}}, ValueError, "lr"),
    ({"sizes": [2, 3, 1], "optimizer": {"name": "sgd", "betas": [0.9, 0.99]}}, ValueError, "optimizer.betas"),
    ({"sizes": [2, 3, 1], "steps": 1.5}, ValueError, "steps"),
    ({"sizes": [2, 3, 1], "batch_size": 0}, ValueError, "batch_size"),
    ({"sizes": [2, 3, 1], "dtype": "float16"}, ValueError, "dtype"),
    ({"sizes": [2, 3, 1], "device": "tpu"}, ValueError, "device"),
    ({"sizes": [2, 3, 1], "data": "mnist"}, ValueError, "data"),
    ({"sizes": [2, 3, 1], "bias": "yes"}, TypeError, "bias"),
    ({"sizes": [2, 3, 1], "colour": "red"}, ValueError, r"unknown key\(s\) \['colour'\]"),
    ({"activation": "tanh"}, ValueError, "sizes: required"),
])
def test_bad_specs_name_the_key(raw, exc, match):
    with pytest.raises(exc, match=match):
        Spec.from_dict(raw)


def test_malformed_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"sizes": [2, 3, 1],')
    with pytest.raises(ValueError, match="not valid JSON"):
        Spec.from_json(str(path))
    with pytest.raises(ValueError, match="file not found"):
        Spec.from_json(str(tmp_path / "missing.json"))
