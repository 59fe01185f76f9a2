"""refnet verify --spec: user specs pass (any valid combination), malformed ones get one line."""
import json

import numpy as np
import pytest
import torch

from refnet import cli
from refnet.compare import ORACLE_AUTOGRAD, TIERS


def run(capsys, *args):
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def write(tmp_path, obj, name="net.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def _npz_spec(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(12, 5)), y=rng.normal(size=(12, 3)))
    return write(tmp_path, {"sizes": [5, 7, 6, 3], "activation": ["leaky_relu", "maxout"],
                            "loss": "mse", "data": str(tmp_path / "d.npz"), "steps": 6,
                            "batch_size": 5, "optimizer": {"name": "sgd", "lr": 0.05,
                                                           "momentum": 0.9, "nesterov": True}})


def test_npz_data_mixed_activations_all_dtypes(tmp_path, capsys):
    # CPU: bitwise, so --strict-bits; CUDA is the tolerance tier (README "Devices"), tested below
    spec = _npz_spec(tmp_path)
    out = tmp_path / "r.json"
    code, text, err = run(capsys, "verify", "--spec", spec, "--dtype", "all", "--device", "cpu",
                          "--strict-bits", "--json", str(out))
    assert code == 0, text + err
    rows = json.loads(out.read_text())["results"]
    assert {(r["dtype"], r["check"]) for r in rows} >= {
        ("float32", "finite_diff"), ("float64", "gradcheck"), ("float32", "loss_curve[6]")}
    for r in rows:
        expected = "bitwise" if r["oracle"] == ORACLE_AUTOGRAD else "tolerance"
        assert r["tier"] == expected, r


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_npz_spec_on_cuda_reaches_the_tolerance_tier(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, text, err = run(capsys, "verify", "--spec", _npz_spec(tmp_path), "--dtype", "all",
                          "--device", "cuda", "--json", str(out))
    assert code == 0, text + err
    rows = json.loads(out.read_text())["results"]
    assert rows and {r["device"] for r in rows} == {"cuda"}
    for r in rows:
        assert TIERS.index(r["tier"]) <= TIERS.index("tolerance"), r


@pytest.mark.parametrize("spec, fragment", [
    ({"sizes": [2, 3, 1], "actvation": "relu"}, "spec: unknown key(s) ['actvation']"),
    ({"sizes": [2, 3, 3, 1], "activation": ["relu"]}, "activation: expected one name or a list of 2"),
    ({"sizes": [2, 3, 1], "optimizer": {"name": "sgd", "lr": 0.1, "momentom": 0.9}},
     "optimizer.momentom: not a setting of 'sgd'"),
    ({"sizes": [2, 3, 1], "steps": 0}, "steps: expected an integer >= 1"),
    ({"sizes": [2, 3, 1], "data": "nowhere.npz"}, "data: file not found"),
    ({"sizes": [3, 3, 1], "data": "xor"}, "sizes: the first layer takes 3 inputs"),
    ([2, 3, 1], "spec: expected a JSON object"),
    ('{"sizes": [2, 3, 1]', "is not valid JSON"),
])
def test_malformed_specs_one_line_exit_2(tmp_path, capsys, spec, fragment):
    code, text, err = run(capsys, "verify", "--spec", write(tmp_path, spec))
    assert code == 2 and text == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err


def test_cuda_without_a_gpu_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, text, err = run(capsys, "verify", "--spec", write(tmp_path, {"sizes": [2, 3, 1]}),
                          "--device", "cuda")
    assert code == 2 and "--device: cuda requested but torch sees no CUDA device" in err


def test_relative_npz_path_is_read_beside_the_spec_file(tmp_path, capsys, monkeypatch):
    from refnet.spec import Spec
    folder = tmp_path / "specs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    np.savez(folder / "mine.npz", x=rng.normal(size=(8, 3)), y=rng.normal(size=(8, 2)))
    spec = write(folder, {"sizes": [3, 4, 2], "loss": "mse", "data": "mine.npz", "steps": 2})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the current folder holds no mine.npz
    assert Spec.from_json(spec).data == str(folder / "mine.npz")
    code, text, err = run(capsys, "verify", "--spec", spec, "--dtype", "float64", "--quiet")
    assert code == 0, text + err
    # absolute paths and the generated data sets are left as they are
    absolute = write(folder, {"sizes": [3, 4, 2], "data": str(folder / "mine.npz")}, "abs.json")
    assert Spec.from_json(absolute).data == str(folder / "mine.npz")
    assert Spec.from_json(write(folder, {"sizes": [2, 1], "data": "xor"}, "x.json")).data == "xor"
    # a missing relative file names the path it looked for
    missing = write(folder, {"sizes": [3, 1], "data": "gone.npz"}, "m.json")
    code, _, err = run(capsys, "verify", "--spec", missing)
    assert code == 2 and f"data: file not found: {folder / 'gone.npz'}" in err
