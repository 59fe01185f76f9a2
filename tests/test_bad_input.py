"""A table of bad inputs walked through the Python API and the CLI.

Each must raise ValueError/TypeError with a one-line message naming the argument (Python), or
print exactly one line, no traceback, and exit 2 (CLI), leaving no file behind.
"""
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch

import manual
from manual import layers
from manual.mlp import MLP, init_params
from refnet import cli, data, examples, settings, twin
from refnet.compare import compare_tensors
from refnet.spec import Spec

F32, F64 = torch.float32, torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def z(*shape, dtype=F64):
    return torch.zeros(shape, dtype=dtype)


def mlp(**kw):
    params = init_params([3, 4, 2], "tanh", True)
    return MLP(params, "tanh", "sum_squared", **kw)


def spec(**kw):
    return Spec.from_dict({"sizes": [2, 3, 1], **kw})


def npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return str(path)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# (id, function of tmp_path, exception type, fragment the message must contain)
API_CASES = [
    ("linear x 1-D", lambda t: layers.linear_forward(z(3), z(2, 3)), ValueError, "x: expected a 2-D"),
    ("linear x int", lambda t: layers.linear_forward(torch.zeros(2, 3, dtype=torch.int64), z(2, 3)),
     TypeError, "x: expected a floating-point"),
    ("linear x list", lambda t: layers.linear_forward([[1.0]], z(1, 1)), TypeError, "x: expected a torch.Tensor"),
    ("linear width", lambda t: layers.linear_forward(z(2, 3), z(4, 5)), ValueError, "x: expected shape [N, 5]"),
    ("linear dtypes", lambda t: layers.linear_forward(z(2, 3, dtype=F32), z(4, 3)), TypeError,
     "weight: expected dtype"),
    ("linear bias shape", lambda t: layers.linear_forward(z(2, 3), z(4, 3), z(5)), ValueError,
     "bias: expected shape [4]"),
    ("linear bias rank", lambda t: layers.linear_forward(z(2, 3), z(4, 3), z(4, 1)), ValueError,
     "bias: expected a 1-D"),
    ("linear dout shape", lambda t: layers.linear_backward(z(2, 5), layers.linear_forward(z(2, 3), z(4, 3))[1]),
     ValueError, "dout: expected shape [2, 4]"),
    ("activation name", lambda t: manual.activation_forward("swish", z(2)), ValueError,
     "activation: unknown name 'swish'; expected one of"),
    ("activation option", lambda t: manual.activation_forward("tanh", z(2), slope=0.1), ValueError,
     "activation options"),
    ("maxout width", lambda t: manual.activation_forward("maxout", z(2, 5), k=2), ValueError,
     "z: expected a width divisible by k=2"),
    ("loss name", lambda t: manual.loss_forward("huber", z(2, 1), z(2, 1)), ValueError, "loss: unknown name 'huber'"),
    ("loss target shape", lambda t: manual.loss_forward("sum_squared", z(2, 3), z(2, 1)), ValueError,
     "target: expected shape [2, 3]"),
    ("loss target dtype", lambda t: manual.loss_forward("mse", z(2, 3), z(2, 3, dtype=F32)), TypeError,
     "target: expected dtype"),
    ("optimizer name", lambda t: manual.make_optimizer("rmsprop", lr=0.1), ValueError, "optimizer.name"),
    ("lr negative", lambda t: manual.make_optimizer("sgd", lr=-0.1), ValueError, "lr: expected"),
    ("lr NaN", lambda t: manual.make_optimizer("sgd", lr=float("nan")), ValueError, "lr: expected"),
    ("lr inf", lambda t: manual.make_optimizer("sgd", lr=float("inf")), ValueError, "lr: expected"),
    ("lr string", lambda t: manual.make_optimizer("sgd", lr="0.1"), ValueError, "lr: expected"),
    ("momentum negative", lambda t: manual.make_optimizer("sgd", lr=0.1, momentum=-1), ValueError, "momentum"),
    ("nesterov no momentum", lambda t: manual.make_optimizer("sgd", lr=0.1, nesterov=True), ValueError,
     "nesterov"),
    ("optimizer unknown setting", lambda t: manual.make_optimizer("sgd", lr=0.1, gamma=2), ValueError,
     "optimizer.gamma"),
    ("params not dict", lambda t: MLP([z(2, 3)]), TypeError, "params: expected a non-empty dict"),
    ("params empty", lambda t: MLP({}), TypeError, "params: expected a non-empty dict"),
    ("params gap", lambda t: MLP({"layers.0.weight": z(3, 2), "layers.2.weight": z(1, 3)}), ValueError,
     "params: missing 'layers.1.weight'"),
    ("params extra", lambda t: MLP({"layers.0.weight": z(1, 2), "head.weight": z(1, 1)}), ValueError,
     "params: unexpected names"),
    ("params widths", lambda t: MLP({"layers.0.weight": z(3, 2), "layers.1.weight": z(1, 4)}), ValueError,
     "params['layers.1.weight']: expected 3 input features"),
    ("params zero width", lambda t: MLP({"layers.0.weight": z(0, 2), "layers.1.weight": z(1, 0)}),
     ValueError, "params['layers.0.weight']: expected a layer at least 1 wide"),
    ("params mixed dtype", lambda t: MLP({"layers.0.weight": z(3, 2), "layers.1.weight": z(1, 3, dtype=F32)}),
     TypeError, "params['layers.1.weight']: expected dtype"),
    ("params int", lambda t: MLP({"layers.0.weight": torch.zeros(3, 2, dtype=torch.int64)}), TypeError,
     "params['layers.0.weight']: expected a floating-point"),
    ("mlp x width", lambda t: mlp().forward(z(5, 4), z(5, 2)), ValueError, "x: expected shape [N, 3]"),
    ("mlp empty batch", lambda t: mlp().forward(z(0, 3), z(0, 2)), ValueError, "x: expected a non-empty batch"),
    ("mlp x int", lambda t: mlp().forward(torch.zeros(5, 3, dtype=torch.int64), z(5, 2)), TypeError, "x: expected"),
    ("mlp x dtype", lambda t: mlp().forward(z(5, 3, dtype=F32), z(5, 2)), TypeError, "x: expected dtype"),
    ("mlp target int", lambda t: mlp().forward(z(5, 3), torch.zeros(5, 2, dtype=torch.int64)), TypeError,
     "target: expected a floating-point"),
    ("mlp step no optimizer", lambda t: mlp().step({}), ValueError, "optimizer: this MLP was built without one"),
    ("mlp activation count", lambda t: MLP(init_params([3, 4, 4, 2], "tanh"), ["tanh"]), ValueError,
     "activation: expected one name or a list of 2"),
    ("init scheme", lambda t: init_params([2, 3], scheme="xavier"), ValueError, "init: unknown scheme"),
    ("spec sizes short", lambda t: Spec.from_dict({"sizes": [3]}), ValueError, "sizes: expected a list"),
    ("spec zero width", lambda t: spec(sizes=[2, 0, 1]), ValueError, "sizes: expected every width >= 1"),
    ("spec sizes float", lambda t: spec(sizes=[2, 3.5, 1]), ValueError, "sizes: expected a list"),
    ("spec steps zero", lambda t: spec(steps=0), ValueError, "steps: expected an integer >= 1"),
    ("spec steps string", lambda t: spec(steps="10"), ValueError, "steps: expected an integer"),
    ("spec steps float", lambda t: spec(steps=2.5), ValueError, "steps: expected an integer"),
    ("spec batch negative", lambda t: spec(batch_size=-1), ValueError, "batch_size"),
    ("spec seed negative", lambda t: spec(seed=-1), ValueError, "seed"),
    ("spec init", lambda t: spec(init="xavier"), ValueError, "init: expected one of"),
    ("spec slope NaN", lambda t: spec(slope=float("nan")), ValueError, "slope: expected a finite number"),
    ("spec k zero", lambda t: spec(k=0), ValueError, "k: expected an integer >= 1"),
    ("spec lr NaN", lambda t: spec(optimizer={"name": "sgd", "lr": float("nan")}), ValueError, "lr"),
    ("spec optimizer no name", lambda t: spec(optimizer={"lr": 0.1}), ValueError, "optimizer: expected an object"),
    ("spec unknown key", lambda t: spec(learning_rate=0.1), ValueError, "spec: unknown key(s) ['learning_rate']"),
    ("spec not object", lambda t: Spec.from_dict([1, 2]), ValueError, "spec: expected a JSON object"),
    ("spec npz missing", lambda t: spec(data=str(t / "none.npz")), ValueError, "data: file not found"),
    ("spec json malformed", lambda t: Spec.from_json(write(t, "s.json", "{sizes: [2]}")), ValueError,
     "not valid JSON"),
    ("spec json missing", lambda t: Spec.from_json(str(t / "nope.json")), ValueError, "--spec: file not found"),
    ("spec json folder", lambda t: Spec.from_json(str(t)), ValueError, "is a folder; expected a JSON file"),
    ("spec json binary", lambda t: Spec.from_json(str(t / "b.json")) if (t / "b.json").write_bytes(b"\xff\xfe\x00")
     else None, ValueError, "not UTF-8"),
    ("npz lacks y", lambda t: data.load_npz(npz(t, x=np.zeros((3, 2)))), ValueError, "lacks array(s) ['y']"),
    ("npz NaN x", lambda t: data.load_npz(npz(t, x=np.full((3, 2), np.nan), y=np.zeros(3, dtype=int))),
     ValueError, "contains NaN"),
    ("npz garbage", lambda t: data.load_npz(write(t, "g.npz", "not a zip")), ValueError, "not a readable .npz"),
    ("npz y rows", lambda t: data.load_npz(npz(t, x=np.zeros((3, 2)), y=np.zeros(4))), ValueError,
     "y in"),
    ("labels beyond outputs", lambda t: data.make_targets(torch.tensor([0, 5]), "values", 3, F64), ValueError,
     "sizes: the last layer has 3 output(s)"),
    ("device name", lambda t: settings.resolve_devices("tpu"), ValueError, "--device: expected cpu, cuda"),
    ("compare non-tensor", lambda t: compare_tensors("g", [1.0], torch.zeros(1)), TypeError, "actual: expected a torch.Tensor for 'g'"),
    ("twin activation", lambda t: twin.Twin([2, 3, 1], "swish"), ValueError, "activation: unknown name"),
    ("twin params names", lambda t: twin.load_params(twin.Twin([2, 3, 1]), {"layers.0.weight": z(3, 2)}),
     ValueError, "params: expected names"),
    ("twin params shape", lambda t: twin.load_params(twin.Twin([2, 3, 1], bias=False),
                                                      {"layers.0.weight": z(3, 3), "layers.1.weight": z(1, 3)}),
     ValueError, "params['layers.0.weight']: expected shape [3, 2]"),
    ("twin optimizer", lambda t: twin.make_optimizer(twin.Twin([2, 3, 1]), "rmsprop"), ValueError, "optimizer.name"),
    ("example name", lambda t: examples.get("nope"), ValueError, "--example: unknown name 'nope'"),
    ("adam betas length", lambda t: manual.make_optimizer("adam", lr=0.1, betas=(0.9,)), ValueError,
     "optimizer.betas: expected two numbers"),
    ("adam beta range", lambda t: manual.make_optimizer("adam", lr=0.1, betas=(1.5, 0.9)), ValueError,
     "optimizer.betas[0]"),
    ("adam eps zero", lambda t: manual.make_optimizer("adam", lr=0.1, eps=0), ValueError, "optimizer.eps"),
    ("adamw momentum", lambda t: manual.make_optimizer("adamw", lr=0.1, momentum=0.9), ValueError,
     "optimizer.momentum: not a setting of 'adamw'"),
    ("ce label range", lambda t: manual.loss_forward("cross_entropy", z(2, 3), torch.tensor([0, 3])),
     ValueError, "target: expected labels in [0, 2]"),
    ("ce float labels", lambda t: manual.loss_forward("cross_entropy", z(2, 3), z(2, 3)), TypeError,
     "target: expected int64 class labels"),
    ("svm negative label", lambda t: manual.loss_forward("svm", z(2, 3), torch.tensor([0, -1])), ValueError,
     "target: expected labels in"),
    ("ce label count", lambda t: manual.loss_forward("cross_entropy", z(2, 3), torch.tensor([0])), ValueError,
     "target: expected shape [2]"),
    ("reg negative", lambda t: mlp(reg=-1), ValueError, "reg: expected a finite number >= 0"),
    ("spec reg NaN", lambda t: spec(reg=float("nan")), ValueError, "reg: expected a finite number"),
]
if not torch.cuda.is_available():
    API_CASES.append(("cuda absent", lambda t: settings.resolve_devices("cuda"), ValueError,
                      "--device: cuda requested but torch sees no CUDA device"))


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(case, tmp_path):
    _, fn, exc, fragment = case
    with pytest.raises(exc) as info:
        fn(tmp_path)
    msg = str(info.value)
    assert fragment in msg, msg
    assert "\n" not in msg, msg


def _cli_cases(t):
    bad_spec = write(t, "bad.json", '{"sizes": [2, 3, 1], "colour": 1}')
    good_spec = write(t, "good.json", json.dumps({"sizes": [2, 3, 1], "data": "xor", "steps": 2}))
    return [
        ("unknown example", ["verify", "--example", "nope"], "--example: unknown name"),
        ("missing spec", ["verify", "--spec", str(t / "missing.json")], "--spec: file not found"),
        ("malformed spec", ["verify", "--spec", write(t, "m.json", "[1, 2")], "not valid JSON"),
        ("unknown key", ["verify", "--spec", bad_spec], "unknown key(s) ['colour']"),
        ("bad sizes", ["verify", "--spec", write(t, "s.json", '{"sizes": "2,3"}')], "sizes: expected"),
        ("bad lr", ["verify", "--spec", write(t, "l.json", '{"sizes": [2, 1], "optimizer": {"name": "sgd", "lr": -1}}')],
         "lr: expected"),
        ("npz without y", ["verify", "--spec", write(t, "n.json", json.dumps(
            {"sizes": [2, 1], "data": npz(t, x=np.zeros((3, 2)))}))], "lacks array(s) ['y']"),
        ("features mismatch", ["verify", "--spec", write(t, "f.json", '{"sizes": [3, 1], "data": "xor"}')],
         "sizes: the first layer takes 3 inputs"),
        ("dtype", ["verify", "--dtype", "float16"], "--dtype"),
        ("device", ["verify", "--device", "tpu"], "--device"),
        ("json folder missing", ["verify", "--spec", good_spec, "--json", str(t / "no" / "r.json")],
         "--json: folder does not exist"),
        ("json is a folder", ["verify", "--spec", good_spec, "--json", str(t)], "is a folder"),
        ("spec and example", ["verify", "--spec", good_spec, "--example", "two_layer_seed"], "not both"),
        ("unknown command", ["frobnicate"], "frobnicate"),
        ("unknown flag", ["verify", "--colour"], "--colour"),
        ("train example", ["train", "--example", "nope"], "--example: unknown name 'nope'"),
        ("train steps", ["train", "--example", "xor", "--steps", "1.5"], "--steps: expected an integer"),
        ("train lr NaN", ["train", "--example", "xor", "--lr", "nan"], "--lr: expected a finite number >= 0"),
        ("train batch", ["train", "--example", "xor", "--batch-size", "0"], "--batch-size"),
        ("train resume missing", ["train", "--resume", str(t / "nope")], "--resume: no checkpoint"),
        ("train tier", ["train", "--example", "xor", "--tier", "exact"], "--tier"),
        ("export parent missing", ["export", "--out", str(t / "a" / "b")], "--out: parent directory"),
        ("export not exportable", ["export", "--out", str(t / "fx"), "--example", "scalar_graph"],
         "provides no exportable case"),
        ("check-port missing dir", ["check-port", str(t / "nope")], "DIR: not a directory"),
        ("bench size", ["bench", "--sizes", "huge"], "--sizes"),
        ("bench threads", ["bench", "--threads", "0"], "--threads"),
    ]


CLI_IDS = [c[0] for c in _cli_cases(__import__("pathlib").Path("/tmp"))]


@pytest.mark.parametrize("index", range(len(CLI_IDS)), ids=CLI_IDS)
def test_cli_bad_input(index, tmp_path):
    _, argv, fragment = _cli_cases(tmp_path)[index]
    before = set(os.listdir(tmp_path))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(argv)
    assert code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err.getvalue()
    assert out.getvalue() == ""
    assert set(os.listdir(tmp_path)) == before  # nothing written, nothing half-written


def test_cli_subprocess_prints_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "refnet", "verify", "--spec", str(tmp_path / "x.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"refnet: error: --spec: file not found: {tmp_path / 'x.json'}"
