import json
import os
import subprocess
import sys

import pytest

from refnet.compare import ORACLE_AUTOGRAD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refnet(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "refnet", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_verify_spec_writes_json(tmp_path):
    spec = tmp_path / "net.json"
    spec.write_text(json.dumps({"sizes": [2, 5, 1], "activation": "tanh", "data": "xor",
                                "steps": 20, "optimizer": {"name": "sgd", "lr": 0.1}}))
    out = tmp_path / "r.json"
    res = refnet("verify", "--spec", str(spec), "--dtype", "all", "--json", str(out), "--strict-bits")
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(out.read_text())
    assert rep["summary"]["all_passed"] and rep["complete"]
    assert {r["dtype"] for r in rep["results"]} == {"float32", "float64"}
    for r in rep["results"]:
        for key in ("example", "check", "device", "dtype", "tier", "passed", "max_abs_diff",
                    "max_ulp", "steps", "identical_steps"):
            assert key in r
        # finite differences and gradcheck are graded by their thresholds, never bitwise
        assert r["tier"] == ("bitwise" if r["oracle"] == ORACLE_AUTOGRAD else "tolerance")


@pytest.mark.parametrize("args, fragment", [
    (["verify", "--example", "no_such_example"], "--example: unknown name 'no_such_example'"),
    (["verify", "--spec", "/nonexistent/x.json"], "--spec: file not found"),
    (["verify", "--dtype", "float16"], "--dtype"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_input_one_line_exit_2(args, fragment, tmp_path):
    res = refnet(*args, cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in res.stderr
    assert res.stdout == ""


def test_a_diverged_run_fails_and_the_table_says_why(tmp_path):
    """A run that blows up to NaN on both sides is not a verified loss curve: NaN steps are never
    identical; the final parameters (NaN at the same positions) say so in the note."""
    spec = tmp_path / "nan.json"
    spec.write_text(json.dumps({"sizes": [2, 8, 1], "activation": "tanh", "data": "xor", "steps": 20,
                                "optimizer": {"name": "sgd", "lr": 1e30}}))
    res = refnet("verify", "--spec", str(spec))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "the run diverged; NaN is never counted as identical in a loss curve" in res.stdout
    curve = next(line for line in res.stdout.splitlines() if "loss_curve[20]" in line)
    assert "FAIL" in curve and "20/20" not in curve


def test_output_into_a_closed_pipe_is_quiet():
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run(f"{sys.executable} -m refnet verify --example xor --dtype float32 | head -1",
                         shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.stdout.startswith("example") and "Broken pipe" not in res.stderr, res.stderr


def test_main_job_takes_verify_options_without_a_verb(monkeypatch):
    """`refnet --quiet --example X` is the main job with verify's options (no verb needed)."""
    from refnet import cli
    from refnet.cli import verify as verify_verb
    seen = {}
    monkeypatch.setattr(verify_verb, "run", lambda args: seen.setdefault("args", args) and 0)
    assert cli.main(["--quiet", "--example", "scalar_graph"]) == 0
    args = seen["args"]
    assert args.command == "verify" and args.quiet and args.example == ["scalar_graph"]
    assert args.device in ("cpu", "cuda")
