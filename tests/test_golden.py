"""Golden fixtures, the NumPy port and check-port: end to end, file format, and every corruption."""
import ast
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from refnet import cli, portcheck, tensorfile
from refnet import fixtures as fixtures_mod  # `fixtures` names the exported folders below
from refnet.cli.export import cases_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = os.path.join(ROOT, "ports", "numpy_port", "port.py")
SMALL_SPEC = {"name": "small", "sizes": [2, 4, 3, 2], "activation": ["tanh", "maxout"],
              "loss": "mse", "data": "circles", "n_samples": 12, "batch_size": 5, "steps": 6,
              "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}}


def load_port():
    spec = importlib.util.spec_from_file_location("numpy_port", PORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Fixtures (small spec in both dtypes, two_layer_seed in float64 with 3 steps) and the NumPy
    port's outputs for them (run as the documented command)."""
    base = tmp_path_factory.mktemp("golden")
    spec_path = base / "small.json"
    spec_path.write_text(json.dumps(SMALL_SPEC))
    cases = cases_for(None, str(spec_path), "all") + cases_for(["two_layer_seed"], None, "float64", 3)
    return export_and_port(base, cases)


def export_and_port(base, cases):
    """Export cases to BASE/fixtures and run the NumPy port on them (the documented command) into
    BASE/port -> (fixtures, port_out)."""
    fixtures, port_out = base / "fixtures", base / "port"
    fixtures_mod.export(str(fixtures), cases)
    res = subprocess.run([sys.executable, PORT, str(fixtures), str(port_out)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return fixtures, port_out


def check(capsys, port_dir, fixtures=None):
    args = ["check-port", str(port_dir)] + (["--fixtures", str(fixtures)] if fixtures else [])
    rc = cli.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def copies(tmp_path, exported):
    fixtures, port_out = exported
    f, p = tmp_path / "fixtures", tmp_path / "port"
    shutil.copytree(fixtures, f)
    shutil.copytree(port_out, p)
    return f, p


# --- end to end ------------------------------------------------------------------------------
def test_export_port_check_end_to_end(exported, capsys):
    fixtures, port_out = exported
    rc, out, err = check(capsys, port_out)          # fixtures found through the port's manifest
    assert rc == 0, out + err
    assert "your port first differs at small.float32/" in out
    assert "first fails" not in out
    manifest = json.loads((fixtures / "manifest.json").read_text())
    assert [c["name"] for c in manifest["cases"]] == ["small.float32", "small.float64",
                                                       "two_layer_seed.float64"]
    n_checked = sum(1 for c in manifest["cases"] for t in c["tensors"] if t["kind"])
    assert f"{n_checked}/{n_checked} tensors pass" in out and "of tol" in out
    rows = portcheck.check_port(str(port_out), str(fixtures))
    assert all(r["passed"] and r["tolerance_used"] <= 1.0 for r in rows)
    seed = manifest["cases"][2]
    assert seed["steps"] == 3 and "3 of the example's 2000 steps" in seed["note"]
    # the reference is the manual MLP, and it equals autograd bit for bit on CPU
    assert {t["autograd_tier"] for c in manifest["cases"] for t in c["tensors"]
            if "autograd_tier" in t} == {"bitwise"}


def test_manifest_lists_canonical_order_and_file_agrees(exported):
    fixtures, _ = exported
    manifest = json.loads((fixtures / "manifest.json").read_text())
    case = manifest["cases"][0]
    names = [t["name"] for t in case["tensors"]]
    assert names == [n for n, _, _ in fixtures_mod.tensor_order(3, bias=True, minibatch=True)]
    # the order of the computation: forward up, loss, then backward down with the grads per layer
    assert names.index("forward.loss") < names.index("backward.grad_output") \
        < names.index("backward.layers.2.grad_pre_activation") < names.index("grads.layers.2.weight") \
        < names.index("backward.layers.1.grad_activation") < names.index("grads.layers.0.bias") \
        < names.index("backward.grad_input") < names.index("train.losses")
    tensors, meta = tensorfile.decode_safetensors((fixtures / case["file"]).read_bytes())
    assert list(tensors) == names and meta["case"] == "small.float32"
    for t in case["tensors"]:
        assert t["dtype"] == {torch.float32: "F32", torch.int64: "I64"}[tensors[t["name"]].dtype]
        if t["kind"]:
            assert t["rtol"] > 0 and t["atol"] > 0 and t["required_tier"] == "tolerance"


def test_safetensors_compatible_both_ways(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 4), "scalar": torch.tensor(2.5, dtype=torch.float64),
               "idx": torch.arange(5), "empty": torch.empty(0, 3, dtype=torch.float64)}
    theirs = st.load(tensorfile.encode_safetensors(tensors, {"case": "x"}))
    path = tmp_path / "lib.safetensors"
    st.save_file(tensors, str(path))
    ours, _ = tensorfile.decode_safetensors(path.read_bytes())
    for got in (theirs, ours):
        assert set(got) == set(tensors)
        for name, t in tensors.items():
            assert got[name].dtype == t.dtype and got[name].shape == t.shape
            assert torch.equal(got[name], t)


def test_port_imports_numpy_only():
    allowed = {"numpy", "hashlib", "json", "os", "struct", "sys", "tempfile", "math", "argparse"}
    tree = ast.parse(open(PORT, encoding="utf-8").read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or ".").split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            imported.add("__import__")
    assert imported <= allowed, imported - allowed


def test_a_wrong_backward_is_caught_where_it_departs(exported, tmp_path, capsys):
    port = load_port()
    port.ACTIVATIONS["tanh"] = (port.tanh_forward, lambda dy, y: dy * (1 - y), None)  # wrong: 1 − y
    out_dir = tmp_path / "bad"
    assert port.main([str(exported[0]), str(out_dir)]) == 0
    rc, out, _ = check(capsys, out_dir)
    assert rc == 1
    assert "your port first fails at small.float32/backward.layers.0.grad_pre_activation" in out


# --- corruption: one-line errors naming the file -------------------------------------------------
@pytest.mark.parametrize("where", ["data", "header"])
def test_flipping_one_byte_in_any_fixture_file_fails_naming_it(exported, tmp_path, capsys, where):
    manifest = json.loads((exported[0] / "manifest.json").read_text())
    for case in manifest["cases"]:
        fixtures, port_out = copies(tmp_path / case["name"] / where, exported)
        path = fixtures / case["file"]
        blob = bytearray(path.read_bytes())
        pos = len(blob) - 3 if where == "data" else 20
        blob[pos] ^= 0x01
        path.write_bytes(bytes(blob))
        rc, out, err = check(capsys, port_out, fixtures)
        assert rc == 2, out + err
        assert len(err.strip().splitlines()) == 1
        assert case["file"] in err and "sha256 mismatch" in err


def test_flipped_byte_in_port_output_names_the_file(exported, tmp_path, capsys):
    fixtures, port_out = copies(tmp_path, exported)
    path = port_out / "small.float64.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x40
    path.write_bytes(bytes(blob))
    rc, _, err = check(capsys, port_out, fixtures)
    assert rc == 2 and "small.float64.safetensors" in err and "corrupted" in err
    # without the port's manifest (a C port need not write one) the changed value itself fails
    (port_out / "manifest.json").unlink()
    rc, out, _ = check(capsys, port_out, fixtures)
    assert rc == 1 and "first fails at small.float64/final.layers.2.bias" in out


def test_truncated_files(exported, tmp_path, capsys):
    fixtures, port_out = copies(tmp_path, exported)
    (port_out / "manifest.json").unlink()
    path = port_out / "small.float32.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    rc, _, err = check(capsys, port_out, fixtures)
    assert rc == 2 and "small.float32.safetensors" in err and "truncated" in err
    path.write_bytes(b"\x01\x02")
    rc, _, err = check(capsys, port_out, fixtures)
    assert rc == 2 and "small.float32.safetensors: truncated" in err
    fix = fixtures / "small.float32.safetensors"
    fix.write_bytes(fix.read_bytes()[:100])
    rc, _, err = check(capsys, port_out, fixtures)
    assert rc == 2 and "small.float32.safetensors: sha256 mismatch" in err


def test_unknown_schema_version(exported, tmp_path, capsys):
    fixtures, port_out = copies(tmp_path, exported)
    m = json.loads((fixtures / "manifest.json").read_text())
    m["schema_version"] = 99
    (fixtures / "manifest.json").write_text(json.dumps(m))
    rc, _, err = check(capsys, port_out, fixtures)
    assert rc == 2 and "schema_version 99 is not supported" in err and "manifest.json" in err
    m["schema_version"] = 1
    del m["cases"][1]["tensors"][3]["shape"]
    (fixtures / "manifest.json").write_text(json.dumps(m))
    rc, _, err = check(capsys, port_out, fixtures)
    assert rc == 2 and "cases[1] needs" in err
    (fixtures / "manifest.json").write_text(json.dumps(m)[:-40])
    rc, _, err = check(capsys, port_out, fixtures)
    assert rc == 2 and "manifest.json: not valid JSON" in err


def test_wrong_dtype_or_shape(exported, tmp_path, capsys):
    fixtures, port_out = copies(tmp_path, exported)
    # the port writes a tensor in the wrong dtype and another in the wrong shape: failures naming them
    (port_out / "manifest.json").unlink()
    path = port_out / "small.float64.safetensors"
    got, _ = tensorfile.decode_safetensors(path.read_bytes())
    got["forward.loss"] = got["forward.loss"].float()
    got["grads.layers.1.weight"] = got["grads.layers.1.weight"].t().contiguous()
    path.write_bytes(tensorfile.encode_safetensors(got))
    rc, out, _ = check(capsys, port_out, fixtures)
    assert rc == 1
    assert "is F32 [], expected F64 []" in out and "is F64 [4, 6], expected F64 [6, 4]" in out
    assert "first fails at small.float64/forward.loss" in out
    # a fixture whose header disagrees with the manifest: a one-line error naming the file
    m = json.loads((fixtures / "manifest.json").read_text())
    m["cases"][0]["tensors"][0]["shape"] = [99, 2]
    (fixtures / "manifest.json").write_text(json.dumps(m))
    rc, _, err = check(capsys, port_out, fixtures)
    assert rc == 2 and "small.float32.safetensors: tensor 'inputs.x'" in err and "[99, 2]" in err


def test_missing_files(exported, tmp_path, capsys):
    fixtures, port_out = copies(tmp_path, exported)
    (port_out / "two_layer_seed.float64.safetensors").unlink()
    (port_out / "manifest.json").unlink()
    rc, out, _ = check(capsys, port_out, fixtures)
    assert rc == 1 and "missing file" in out and "two_layer_seed.float64.safetensors" in out
    (fixtures / "small.float64.safetensors").unlink()
    rc, _, err = check(capsys, port_out, fixtures)
    assert rc == 2 and "small.float64.safetensors: missing fixture file" in err
    rc, _, err = check(capsys, port_out, tmp_path / "nowhere")
    assert rc == 2 and "nowhere" in err
    rc, _, err = check(capsys, port_out)
    assert rc == 2 and "--fixtures" in err


# --- atomic export --------------------------------------------------------------------------
def test_export_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    spec_path = tmp_path / "s.json"
    spec_path.write_text(json.dumps({**SMALL_SPEC, "batch_size": None, "steps": 2}))
    out = tmp_path / "fx"
    assert cli.main(["export", "--out", str(out), "--spec", str(spec_path)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"manifest.json", "small.float64.safetensors"}
    assert cli.main(["export", "--out", str(out), "--spec", str(spec_path)]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err

    calls = []
    real = fixtures_mod.encode_safetensors

    def dies_on_second_case(*a, **k):  # the export is killed after writing one file of two
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fixtures_mod, "encode_safetensors", dies_on_second_case)
    rc = cli.main(["export", "--out", str(out), "--spec", str(spec_path), "--dtype", "all", "--force"])
    assert rc == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fx", "s.json"]  # no temp dir left
    monkeypatch.setattr(fixtures_mod, "encode_safetensors", real)
    assert cli.main(["export", "--out", str(out), "--spec", str(spec_path), "--dtype", "all",
                     "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "small.float32.safetensors",
                                                     "small.float64.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fx", "s.json"]


def test_export_default_cases_and_bad_names(capsys):
    names = [n for n, _ in cases_for(None, None, None, steps=2)]
    assert "two_layer_seed.float32" in names and "two_layer_seed.float64" in names
    assert cli.main(["export", "--out", "/tmp/x", "--example", "nope"]) == 2
    assert "--example: unknown name 'nope'" in capsys.readouterr().err


def test_isolated_elementwise_ops_are_bitwise(exported, tmp_path):
    """--isolate feeds each op the fixture's input: the elementwise ops, written in PyTorch's
    order (loss gradient, sigmoid/tanh/maxout backward with tanh's fused 1 − y²), match bit for bit."""
    port = load_port()
    fixtures = exported[0]
    assert port.main(["--isolate", str(fixtures), str(tmp_path / "iso")]) == 0
    tiers = {(r["case"], r["name"]): r["tier"] for r in portcheck.check_port(str(tmp_path / "iso"),
                                                                         str(fixtures))}
    for case in ("small.float32", "small.float64", "two_layer_seed.float64"):
        assert tiers[case, "backward.grad_output"] == "bitwise"
        assert tiers[case, "backward.layers.0.grad_pre_activation"] == "bitwise"   # tanh / sigmoid
    assert tiers["small.float64", "backward.layers.1.grad_pre_activation"] == "bitwise"  # maxout
    assert tiers["small.float64", "forward.layers.1.activation"] == "bitwise"           # maxout


# --- QA fixes: reg, label losses, refusing what the port does not support, created_with ----------
LOSS_SPECS = {
    "reg": {"sizes": [3, 6, 2], "activation": "relu", "reg": 0.05, "loss": "mse", "steps": 5,
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "batch_size": 16,
            "n_samples": 40},
    "ce": {"sizes": [2, 6, 5, 3], "activation": "tanh", "reg": 0.01, "loss": "cross_entropy",
           "data": "spiral", "n_samples": 40, "batch_size": 16, "steps": 5,
           "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}},
    "svm": {"sizes": [2, 6, 3], "activation": "relu", "loss": "svm", "data": "spiral",
            "n_samples": 40, "steps": 5, "optimizer": {"name": "sgd", "lr": 0.1}},
}


def _spec_cases(base, specs):
    """Export cases (both dtypes) of named specs, each written to BASE/NAME.json first."""
    cases = []
    for name, spec in specs.items():
        path = base / f"{name}.json"
        path.write_text(json.dumps({"name": name, **spec}))
        cases += cases_for(None, str(path), "all")
    return cases


@pytest.fixture(scope="module")
def loss_fixtures(tmp_path_factory):
    base = tmp_path_factory.mktemp("losses")
    fixtures_mod.export(str(base / "fixtures"), _spec_cases(base, LOSS_SPECS))
    return base / "fixtures"


def test_port_implements_reg_cross_entropy_and_svm(loss_fixtures, tmp_path, capsys):
    """reg (L2 on the weights, manual's order) and the label losses pass check-port in both dtypes;
    with --isolate the loss and its gradient are bitwise in float64."""
    port = load_port()
    assert port.main([str(loss_fixtures), str(tmp_path / "port")]) == 0
    capsys.readouterr()
    rc, out, err = check(capsys, tmp_path / "port")
    assert rc == 0, out + err
    assert "first fails" not in out
    rows = portcheck.check_port(str(tmp_path / "port"), str(loss_fixtures))
    assert len({r["case"] for r in rows}) == 6 and all(r["passed"] for r in rows)
    assert port.main(["--isolate", str(loss_fixtures), str(tmp_path / "iso")]) == 0
    tiers = {(r["case"], r["name"]): r["tier"] for r in portcheck.check_port(str(tmp_path / "iso"),
                                                                         str(loss_fixtures))}
    for case in ("reg.float64", "svm.float64", "svm.float32"):
        assert tiers[case, "backward.grad_output"] == "bitwise"
    for case in ("reg.float64", "ce.float64", "svm.float64"):
        assert tiers[case, "forward.loss"] == "bitwise"


ACT_SPECS = {
    "smooth": {"sizes": [3, 7, 6, 5, 2], "activation": ["gelu", "gelu_tanh", "silu"],
               "loss": "mse", "n_samples": 24, "steps": 4, "optimizer": {"name": "sgd", "lr": 0.1}},
}


def test_port_implements_gelu_gelu_tanh_and_silu(tmp_path, capsys):
    """The NumPy port's GELU (erf), GELU (tanh) and SiLU pass check-port in both dtypes; with
    --isolate each activation's forward and backward is within its tolerance on its own."""
    fixtures = tmp_path / "fixtures"
    fixtures_mod.export(str(fixtures), _spec_cases(tmp_path, ACT_SPECS))
    port = load_port()
    for flags, out in (([], "port"), (["--isolate"], "iso")):
        assert port.main(flags + [str(fixtures), str(tmp_path / out)]) == 0
        capsys.readouterr()
        rows = portcheck.check_port(str(tmp_path / out), str(fixtures))
        assert len({r["case"] for r in rows}) == 2
        assert all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
        assert {f"backward.layers.{i}.grad_pre_activation" for i in range(3)} <= \
            {r["name"] for r in rows}


@pytest.mark.parametrize("key, value, says", [
    ("loss", "huber", "loss 'huber' is not supported by the NumPy port"),
    ("activation", ["relu", "mish"], "activation 'mish' is not supported by the NumPy port"),
    ("optimizer", {"name": "rmsprop", "lr": 0.01}, "optimizer 'rmsprop' is not supported by the NumPy port"),
    ("optimizer", {"name": "sgd", "lr": 0.1, "maximize": True}, "optimizer settings ['maximize']"),
    ("dtype", "float16", "dtype 'float16' is not supported by the NumPy port"),
    ("reg", -1.0, "reg -1.0 is not supported by the NumPy port"),
    ("dropout", 1.5, "dropout 1.5 is not supported by the NumPy port"),
    ("norm", "groupnorm", "norm 'groupnorm' is not supported by the NumPy port"),
    ("embedding", {"vocab": 27, "dim": 2}, "embedding {'vocab': 27, 'dim': 2} is not supported"),
    ("autocast", "bfloat16", "autocast 'bfloat16' with dtype 'float64' is not supported"),
    ("grad_scaler", True, "grad_scaler without autocast is not supported by the NumPy port"),
    ("blocks", {"n": 1, "width": 4, "hidden": 8}, "blocks {'n': 1, 'width': 4, 'hidden': 8} is not"),
    ("lr_schedule", {"name": "onecycle"}, "lr_schedule {'name': 'onecycle'} is not supported"),
    ("accumulate", 0, "accumulate 0 is not supported by the NumPy port"),
    ("clip_grad_norm", {"max_norm": 1.0, "norm_type": 1}, "clip_grad_norm {'max_norm': 1.0, 'norm"),
])
def test_port_refuses_unsupported_specs_before_computing(loss_fixtures, tmp_path, capsys,
                                                         key, value, says):
    """An unsupported setting in any case (here the second) is one line and exit 2, before any
    case is computed or any file written."""
    fixtures = tmp_path / "fixtures"
    shutil.copytree(loss_fixtures, fixtures)
    manifest = json.loads((fixtures / "manifest.json").read_text())
    manifest["cases"][1]["spec"][key] = value
    (fixtures / "manifest.json").write_text(json.dumps(manifest))
    port = load_port()
    assert port.main([str(fixtures), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("numpy port: error: case 'reg.float64': ")
    assert says in err, err
    assert not (tmp_path / "out").exists()


def test_manifest_records_threads_and_cpu_capability(exported):
    created = json.loads((exported[0] / "manifest.json").read_text())["created_with"]
    assert created["threads"] == torch.get_num_threads() >= 1
    assert created["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_an_error_in_the_last_element_of_a_tensor_is_caught(exported, tmp_path, capsys):
    """check-port compares every element: an error planted in the LAST element of the largest
    tensor of a case (not in the first few, where the other tests plant theirs) fails the row."""
    fixtures, port_out = copies(tmp_path, exported)
    (port_out / "manifest.json").unlink()   # a port without a manifest: the values decide
    path = port_out / "small.float64.safetensors"
    got, meta = tensorfile.decode_safetensors(path.read_bytes(), str(path))
    name = max(got, key=lambda k: (got[k].numel(), k))
    t = got[name].clone()
    assert t.numel() > 16, (name, t.shape)   # later than any prefix a lazy check might compare
    flat = t.view(-1)
    flat[-1] = flat[-1] * (1 + 1e-3) + 1e-3
    got[name] = t
    path.write_bytes(tensorfile.encode_safetensors(got, meta))
    rows = portcheck.check_port(str(port_out), str(fixtures))
    bad = [r for r in rows if not r["passed"]]
    assert [(r["case"], r["name"]) for r in bad] == [("small.float64", name)], bad
    rc, out, _ = check(capsys, port_out, fixtures)
    assert rc == 1 and f"first fails at small.float64/{name}" in out


def _plant_relative_error(port_out, fixtures, case, share):
    """In the port's output of `case`, move the checked element with the largest |expected| off by
    atol + share·rtol·|expected| (the case's manifest tolerances) -> (tensor name, error / atol,
    error / (atol + rtol·|expected|)), measured on the value as written."""
    manifest = json.loads((fixtures / "manifest.json").read_text())
    entries = next(c for c in manifest["cases"] if c["name"] == case)["tensors"]
    ref = tensorfile.decode_safetensors((fixtures / f"{case}.safetensors").read_bytes(), case)[0]
    e = max((e for e in entries if e["kind"]), key=lambda e: (float(ref[e["name"]].abs().max()),
                                                               e["name"]))
    path = port_out / f"{case}.safetensors"
    got, meta = tensorfile.decode_safetensors(path.read_bytes(), str(path))
    expected = ref[e["name"]].reshape(-1)
    i = int(expected.abs().argmax())
    b = float(expected[i])
    t = got[e["name"]].clone()
    t.view(-1)[i] = b + math.copysign(e["atol"] + share * e["rtol"] * abs(b), b)
    got[e["name"]] = t
    path.write_bytes(tensorfile.encode_safetensors(got, meta))
    err = abs(float(t.view(-1)[i]) - b)
    return e["name"], err / e["atol"], err / (e["atol"] + e["rtol"] * abs(b))


@pytest.mark.parametrize("case", ["small.float32", "small.float64"])
def test_relative_tolerance_is_applied(exported, tmp_path, case):
    """check-port's bound is atol + rtol·|expected|: an error past atol but inside the bound passes
    (at the tolerance tier), one just past the bound fails; a check-port without rtol fails the
    first."""
    for share, passes in ((0.9, True), (1.01, False)):
        fixtures, port_out = copies(tmp_path / f"s{share}", exported)
        (port_out / "manifest.json").unlink()   # a port without a manifest: the values decide
        name, over_atol, used = _plant_relative_error(port_out, fixtures, case, share)
        # (the manifest's atol is about rtol·max|expected|: the error is nearly twice atol)
        assert over_atol > 1.5 and (used < 0.99 if passes else 1.0 < used < 1.02), (over_atol, used)
        row = next(r for r in portcheck.check_port(str(port_out), str(fixtures))
                   if (r["case"], r["name"]) == (case, name))
        assert row["passed"] is passes and row["tier"] == ("tolerance" if passes else "fail"), row
        assert row["tolerance_used"] == pytest.approx(used)

# --- issue 15: batch norm, layer norm, dropout, embedding ------------------------------------------
LAYER_SPECS = {
    # embedding → linear → layer norm → tanh → dropout (×2) → linear → cross-entropy, mini-batches
    "nde": {"sizes": [6, 8, 7, 27], "activation": "tanh", "loss": "cross_entropy",
            "norm": "layernorm", "dropout": 0.3, "embedding": {"vocab": 27, "dim": 2, "context": 3},
            "data": "names", "n_samples": 3, "batch_size": 8, "steps": 5,
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
    # batch norm (running statistics, momentum, eps) and dropout with L2, mini-batches
    "bnd": {"sizes": [2, 8, 6, 3], "activation": "relu", "loss": "cross_entropy", "reg": 0.1,
            "norm": "batchnorm", "dropout": 0.25, "momentum": 0.2, "eps": 1e-3, "data": "spiral",
            "n_samples": 12, "batch_size": 5, "steps": 5},
}


@pytest.fixture(scope="module")
def layer_fixtures(tmp_path_factory):
    """The two specs above in both dtypes, exported, and the NumPy port run on them (subprocess)."""
    base = tmp_path_factory.mktemp("layers")
    fixtures, port_out = base / "fixtures", base / "port"
    fixtures_mod.export(str(fixtures), _spec_cases(base, LAYER_SPECS))
    res = subprocess.run([sys.executable, PORT, str(fixtures), str(port_out)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return fixtures, port_out


def test_norm_dropout_embedding_export_and_port_pass_check_port(layer_fixtures, capsys):
    fixtures, port_out = layer_fixtures
    manifest = json.loads((fixtures / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    names = {c["name"]: [t["name"] for t in c["tensors"]] for c in manifest["cases"]}
    nde, bnd = names["nde.float64"], names["bnd.float32"]
    for name in ("inputs.masks.layers.0", "train.masks.layers.1", "forward.embed.output",
                 "forward.layers.1.linear", "forward.norms.1.invstd", "forward.layers.0.dropout",
                 "backward.layers.0.grad_dropout", "backward.layers.0.grad_linear",
                 "grads.norms.0.weight", "grads.embed.weight", "final.embed.weight"):
        assert name in nde, name
    for name in ("init.norms.0.running_var", "init.norms.1.num_batches_tracked",
                 "forward.norms.0.running_mean", "train.norms.1.running_var",
                 "final.norms.0.num_batches_tracked"):
        assert name in bnd, name
    assert "forward.norms.0.running_mean" not in nde            # layer norm keeps no statistics
    tensors = {t["name"]: t for c in manifest["cases"] if c["name"] == "nde.float64"
               for t in c["tensors"]}
    assert tensors["inputs.x"]["dtype"] == "I64" and tensors["inputs.x"]["shape"][1] == 3
    # the reference equals autograd bit for bit, running statistics included
    assert {t["autograd_tier"] for c in manifest["cases"] for t in c["tensors"]
            if "autograd_tier" in t} == {"bitwise"}
    rc, out, err = check(capsys, port_out)
    assert rc == 0, out + err
    n_checked = sum(1 for c in manifest["cases"] for t in c["tensors"] if t["kind"])
    assert f"{n_checked}/{n_checked} tensors pass" in out and "first fails" not in out
    rows = portcheck.check_port(str(port_out), str(fixtures))
    assert all(r["passed"] and (r["tolerance_used"] or 0) <= 1.0 for r in rows)
    # the masks are applied, not redrawn: the integer statistics count every training step
    tiers = {(r["case"], r["name"]): r["tier"] for r in rows}
    assert tiers["bnd.float64", "final.norms.0.num_batches_tracked"] == "bitwise"


def test_isolated_dropout_and_embedding_are_bitwise(layer_fixtures, tmp_path):
    """Fed the fixture's inputs, the mask scaling (mask/(1 − p) in the dtype), the lookup and the
    index-order accumulation of repeated rows give the manual MLP's bits."""
    port = load_port()
    fixtures = layer_fixtures[0]
    assert port.main(["--isolate", str(fixtures), str(tmp_path / "iso")]) == 0
    tiers = {(r["case"], r["name"]): r["tier"] for r in portcheck.check_port(str(tmp_path / "iso"),
                                                                         str(fixtures))}
    for dt in ("float32", "float64"):
        for case in ("nde", "bnd"):
            assert tiers[f"{case}.{dt}", "forward.layers.0.dropout"] == "bitwise"
            assert tiers[f"{case}.{dt}", "backward.layers.1.grad_activation"] == "bitwise"
        assert tiers[f"nde.{dt}", "forward.embed.output"] == "bitwise"
        assert tiers[f"nde.{dt}", "grads.embed.weight"] == "bitwise"


def test_a_wrong_running_variance_is_caught_late(layer_fixtures, tmp_path, capsys):
    """The biased σ² in the running variance (instead of σ²·N/(N − 1)) changes no gradient and no
    loss: check-port first fails at the running statistics, after the layer's forward values."""
    port = load_port()
    good = port.batchnorm_forward

    def biased(z, w, b, buffers, training, momentum, eps):
        var_before = buffers["running_var"]
        out, mean, invstd, cache = good(z, w, b, buffers, training, momentum, eps)
        t = z.dtype.type
        var = ((z - mean) ** 2).sum(axis=0) / t(z.shape[0])
        buffers["running_var"] = (t(1) - t(momentum)) * var_before + t(momentum) * var
        return out, mean, invstd, cache
    port.batchnorm_forward = biased
    out_dir = tmp_path / "bad"
    assert port.main([str(layer_fixtures[0]), str(out_dir)]) == 0
    rc, out, _ = check(capsys, out_dir)
    assert rc == 1
    assert "your port first fails at bnd.float32/forward.norms.0.running_var" in out
    rows = portcheck.check_port(str(out_dir), str(layer_fixtures[0]))
    failed = {r["name"] for r in rows if not r["passed"]}
    assert {"train.norms.1.running_var", "final.norms.1.running_var"} <= failed
    assert not any(n.startswith(("grads.", "backward.")) or n == "train.losses" for n in failed)


def test_a_small_error_in_the_last_norm_tensor_is_caught(layer_fixtures, tmp_path, capsys):
    """One element of the final running variance of the last norm (near the end of the canonical
    order), off by 1e-4 relative, fails and is named."""
    port = load_port()
    fixtures, port_out = layer_fixtures
    bad = tmp_path / "port"
    shutil.copytree(port_out, bad)
    (bad / "manifest.json").unlink()              # the edited file no longer matches its sha256
    path = bad / "bnd.float64.safetensors"
    tensors = port.read_safetensors(str(path))
    name = "final.norms.1.running_var"
    v = tensors[name].copy()
    v[-1] *= 1 + 1e-4
    tensors[name] = v
    port.write_safetensors(str(path), tensors)
    rc, out, _ = check(capsys, bad, fixtures)
    assert rc == 1
    assert f"your port first fails at bnd.float64/{name}" in out


def test_port_batchnorm_eval_mode_matches_torch():
    """Eval mode (not in the fixtures, which train): the running statistics normalize."""
    port = load_port()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    w, b = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    rm, rv = torch.randn(4, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    ref = torch.nn.functional.batch_norm(z, rm, rv, w, b, training=False, eps=1e-5)
    bufs = {"running_mean": rm.numpy().copy(), "running_var": rv.numpy().copy(),
            "num_batches_tracked": np.int64(3)}
    out, _, _, cache = port.batchnorm_forward(z.numpy(), w.numpy(), b.numpy(), bufs, False, 0.1, 1e-5)
    assert np.allclose(out, ref.numpy(), rtol=1e-12, atol=1e-12)
    assert bufs["num_batches_tracked"] == 3 and np.array_equal(bufs["running_mean"], rm.numpy())
    dy = np.ones_like(out)
    dz, _, _ = port.batchnorm_backward(dy, cache)
    assert np.allclose(dz, w.numpy() / np.sqrt(rv.numpy() + 1e-5), rtol=1e-12)
