"""refnet train: lockstep runs, outputs, checkpoints and resume, divergence detection, data."""
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import manual.mlp
from refnet import cli, data, examples, run_outputs, train as train_mod
from refnet.checkpoint import state_differences
from refnet.cli import train as cli_train
from refnet.spec import Spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_MPL = True
try:
    import matplotlib  # noqa: F401
except ImportError:
    HAS_MPL = False


def need_matplotlib():
    """The plot assertions that follow need matplotlib: without it, a visible skip (the
    assertions before this call have run), never a silent pass."""
    if not HAS_MPL:
        pytest.skip("matplotlib not installed: the PNG outputs were not checked")


def small_spec(**over):
    """circles with mini-batches and momentum: exercises the batch schedule and optimizer state."""
    raw = dict(sizes=[2, 7, 2], activation="tanh", loss="mse", data="circles", n_samples=50,
               batch_size=16, steps=60, optimizer={"name": "sgd", "lr": 0.2, "momentum": 0.9},
               name="small")
    return Spec(**{**raw, **over})


def read_csv(path):
    with open(path) as f:
        return f.read().splitlines()


def test_cli_xor_writes_every_output_and_learns(tmp_path):
    out = tmp_path / "d"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "scripts/train.py", "--example", "xor", "--steps", "500",
                          "--device", "cpu", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "tier bitwise" in res.stdout and res.stderr == ""  # not a terminal: no bar
    expected = {"losses.csv", "summary.json", "checkpoint.pt"}
    assert expected <= set(os.listdir(out))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 500
    assert summary["tier"] == "bitwise" and summary["identical_steps"] == 500
    assert summary["accuracy_manual"] == 1.0 == summary["accuracy_twin"]
    rows = read_csv(out / "losses.csv")
    assert rows[0] == "step,manual_loss,twin_loss,abs_diff" and len(rows) == 501
    step, lm, lt, diff = rows[-1].split(",")
    assert step == "499" and float(lm) == summary["final_loss_manual"] and float(diff) == 0.0
    assert float(rows[1].split(",")[1]) > 100 * float(lm)  # the loss went down
    need_matplotlib()
    for png in ("loss_curves.png", "decision_boundary.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_then_resumed_curve_is_bitwise_the_uninterrupted_one(tmp_path):
    straight = train_mod.train(small_spec(), tmp_path / "straight", check_every=7, progress=False)
    assert straight["status"] == "completed"

    def interrupt_at_29(step, loss_m, loss_t):
        if step == 29:
            # as Ctrl-C, delivered to this thread before raise_signal returns (os.kill may
            # deliver it to another thread, later): stop at the step boundary
            signal.raise_signal(signal.SIGINT)

    cut = train_mod.train(small_spec(), tmp_path / "cut", check_every=7, progress=False,
                          on_step=interrupt_at_29)
    assert cut["status"] == "interrupted" and cut["steps"] == 30 and cut["last_checkpoint"] == 30
    assert "resume with --resume" in cut["message"]
    resumed = train_mod.train(None, tmp_path / "cut", check_every=7, progress=False,
                              resume=tmp_path / "cut")
    assert resumed["status"] == "completed" and resumed["resumed_from"] == 30
    assert read_csv(tmp_path / "cut" / "losses.csv") == read_csv(tmp_path / "straight" / "losses.csv")
    a = train_mod.load_checkpoint(tmp_path / "straight")
    b = train_mod.load_checkpoint(tmp_path / "cut")
    assert torch.equal(a["losses_manual"].view(torch.int64), b["losses_manual"].view(torch.int64))
    for side in ("manual_params", "twin_params"):
        for name, p in a[side].items():
            assert torch.equal(p.view(torch.int64), b[side][name].view(torch.int64)), (side, name)
    assert a["manual_optimizer"]["buffers"].keys() == b["manual_optimizer"]["buffers"].keys()
    # the second half sees other batches than the first (a resume that restarted the schedule
    # would fail the equality above), and momentum carries state across the cut
    idx = data.batches(50, 16, 60, 0)
    assert any(not torch.equal(i, j) for i, j in zip(idx[:30], idx[30:]))
    assert all(buf.abs().max() > 0 for buf in b["manual_optimizer"]["buffers"].values())


def test_resume_extends_a_finished_run_via_cli(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert cli.main(["train", "--example", "xor", "--steps", "20", "--device", "cpu", "--out", out,
                     "--quiet"]) == 0
    assert cli.main(["train", "--resume", out, "--steps", "40", "--quiet"]) == 0
    assert len(read_csv(os.path.join(out, "losses.csv"))) == 41
    assert cli.main(["train", "--example", "xor", "--steps", "40", "--device", "cpu", "--out",
                     str(tmp_path / "s"), "--quiet"]) == 0
    assert read_csv(os.path.join(out, "losses.csv")) == read_csv(tmp_path / "s" / "losses.csv")
    capsys.readouterr()
    assert cli.main(["train", "--resume", out, "--lr", "0.3", "--steps", "50"]) == 2
    assert "--resume: optimizer is" in capsys.readouterr().err
    assert cli.main(["train", "--resume", out, "--steps", "10"]) == 2
    assert "already at step 40" in capsys.readouterr().err


@pytest.mark.parametrize("pieces", [
    dict(dropout=0.3),                                                   # the dropout streams
    dict(norm="batchnorm"),                                              # running statistics
    dict(optimizer={"name": "adam", "lr": 0.01}),                        # Adam's moments and step
    dict(norm="batchnorm", dropout=0.2, optimizer={"name": "adamw", "lr": 0.01}),
], ids=["dropout", "batchnorm", "adam", "all"])
def test_resume_restores_every_piece_of_state(tmp_path, pieces):
    """A run cut at step 13 and resumed equals the unbroken run bitwise: its losses and every
    piece of state the final checkpoint carries.  Each spec moves one piece that a resume which
    forgot it would leave at its start value (a fresh dropout stream, fresh running statistics,
    zeroed optimizer moments)."""
    net = dict(sizes=[2, 16, 3], activation="relu", loss="cross_entropy", data="spiral",
               n_samples=60, batch_size=20)   # batch norm at width 7 (small_spec) is 1 ulp off
    spec = small_spec(steps=30, **net, **pieces)
    straight = train_mod.train(spec, tmp_path / "a", check_every=10, progress=False)
    assert straight["status"] == "completed" and straight["tier"] == "bitwise"
    train_mod.train(small_spec(steps=13, **net, **pieces), tmp_path / "b", check_every=10,
                    progress=False)
    resumed = train_mod.train(spec, tmp_path / "b", check_every=10, progress=False,
                              resume=tmp_path / "b")
    assert resumed["resumed_from"] == 13 and resumed["tier"] == "bitwise"
    assert read_csv(tmp_path / "b" / "losses.csv") == read_csv(tmp_path / "a" / "losses.csv")
    assert state_differences(train_mod.load_checkpoint(tmp_path / "a"),
                             train_mod.load_checkpoint(tmp_path / "b")) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_corrupt_checkpoint_is_refused(tmp_path, capsys, damage):
    out = tmp_path / "c"
    train_mod.train(small_spec(steps=10), out, progress=False)
    path = out / "checkpoint.pt"
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01
    elif damage == "truncate":
        raw = raw[: len(raw) - 100]
    else:
        raw = bytearray(b"PK\x03\x04 not ours")
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt or truncated" if damage != "foreign"
                       else "not a refnet checkpoint"):
        train_mod.load_checkpoint(out)
    assert cli.main(["train", "--resume", str(out), "--steps", "20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("refnet: error: --resume:")


def test_broken_manual_backward_stops_the_run(tmp_path, monkeypatch, capsys):
    real = manual.mlp.linear_backward

    def off_by_a_bit(dout, cache):
        dx, dweight, dbias = real(dout, cache)
        return dx, dweight * (1 + 2 ** -40), dbias

    monkeypatch.setattr(manual.mlp, "linear_backward", off_by_a_bit)
    summary = train_mod.train(small_spec(), tmp_path / "b", check_every=10, progress=False)
    assert summary["status"] == "diverged" and summary["steps"] == 2
    msg = summary["divergence"]
    assert msg.startswith("step 1: loss diverged beyond the bitwise tier on cpu/float64")
    assert "manual" in msg and "twin" in msg and "max ulp" in msg
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "diverged"
    # the CLI: one line naming the step and the tensor, exit 1
    assert cli.main(["train", "--example", "xor", "--device", "cpu", "--steps", "100",
                     "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged: step 1: loss" in err[0]


def test_param_check_catches_what_the_loss_does_not_yet(monkeypatch):
    # Corrupt only the first layer's bias gradient at the last step: the losses of every step
    # agree, the final parameters do not.
    real = manual.mlp.MLP.step
    calls = {"n": 0}

    def step(self, grads):
        calls["n"] += 1
        if calls["n"] == 20:
            grads = {**grads, "layers.0.bias": grads["layers.0.bias"] * 1.5}
        return real(self, grads)

    monkeypatch.setattr(manual.mlp.MLP, "step", step)
    summary = train_mod.train(small_spec(steps=20), None, check_every=10, progress=False)
    assert summary["status"] == "diverged" and summary["steps"] == 20
    assert summary["divergence"].startswith("step 19: layers.0.bias diverged beyond the bitwise")


def test_spiral_is_cs231n_construction():
    n, k = 50, 3
    x, y = data.spiral(n_per_class=n, classes=k, noise=0.0)
    for j in range(k):  # cs231n: r = linspace(0, 1, N); t = linspace(4j, 4(j+1), N) + randn·0.2
        r = np.linspace(0.0, 1, n)
        t = np.linspace(j * 4, (j + 1) * 4, n)
        np.testing.assert_allclose(x[j * n:(j + 1) * n].numpy(), np.c_[r * np.sin(t), r * np.cos(t)],
                                   rtol=0, atol=1e-14)  # torch.linspace rounds unlike numpy
        assert (y[j * n:(j + 1) * n] == j).all()
    xn, yn = data.spiral(n_per_class=n, classes=k, noise=0.2, seed=3)
    assert torch.equal(yn, y) and not torch.equal(xn, x)
    assert torch.allclose(xn.norm(dim=1), x.norm(dim=1))  # noise turns the angle, not the radius
    assert torch.equal(xn, data.spiral(n_per_class=n, classes=k, noise=0.2, seed=3)[0])


def test_npz_spec_trains_and_draws_its_boundary(tmp_path, capsys):
    x, y = data.spiral(n_per_class=20, classes=3, seed=1)
    path = tmp_path / "mine.npz"
    np.savez(path, x=x.numpy().astype(np.float32), y=y.numpy())
    spec = tmp_path / "net.json"
    spec.write_text(json.dumps({"sizes": [2, 12, 3], "activation": "relu", "loss": "mse",
                                "data": str(path), "steps": 40, "batch_size": 25,
                                "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.5}}))
    out = tmp_path / "o"
    assert cli.main(["train", "--spec", str(spec), "--dtype", "float32", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["name"] == "net" and summary["dtype"] == "float32"
    assert summary["tier"] == "bitwise" and 0 <= summary["accuracy_manual"] <= 1
    with pytest.raises(ValueError, match="data: file not found"):
        train_mod.train(Spec(sizes=[2, 3, 1], data=str(tmp_path / "missing.npz")), None)
    need_matplotlib()
    assert (out / "decision_boundary.png").exists()


def test_default_tier_and_example_table():
    assert train_mod.default_tier(small_spec()) == "bitwise"
    assert train_mod.default_tier(small_spec(activation="elu")) == "tolerance"
    assert train_mod.default_tier(small_spec(device="cpu", activation="relu")) == "bitwise"
    assert set(examples.trainable()) >= {"xor", "circles", "spiral", "two_layer_seed", "random"}
    seed = examples.get("two_layer_seed")
    spec = seed.build_spec()
    assert spec.sizes == [1000, 100, 10] and seed.params(spec)["layers.0.weight"].shape == (100, 1000)
    with pytest.raises(ValueError, match="--example: unknown name 'nope'"):
        examples.get("nope")
    with pytest.raises(ValueError, match="--example: 'scalar_graph' trains no single MLP"):
        examples.get("scalar_graph").build_spec()
    with pytest.raises(ValueError, match="--tier"):
        train_mod.train(small_spec(steps=1), None, tier="close enough")


def test_progress_bar_when_asked(capsys):
    pytest.importorskip("tqdm")
    train_mod.train(small_spec(steps=12), None, check_every=5, progress=True)
    err = capsys.readouterr().err
    assert "small" in err and "12/12" in err and "tier=bitwise" in err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_lockstep_and_resume(tmp_path):
    spec = small_spec(device="cuda", dtype="float32")
    straight = train_mod.train(spec, tmp_path / "a", check_every=7, progress=False)
    assert straight["status"] == "completed", straight["divergence"]
    assert straight["allowed_tier"] == "tolerance" and math.isfinite(straight["final_loss_manual"])
    train_mod.train(small_spec(device="cuda", dtype="float32", steps=30), tmp_path / "b",
                    check_every=7, progress=False)
    train_mod.train(spec, tmp_path / "b", check_every=7, progress=False, resume=tmp_path / "b")
    # deterministic algorithms on (refnet.settings.determinism): same kernels, same bits
    assert read_csv(tmp_path / "a" / "losses.csv") == read_csv(tmp_path / "b" / "losses.csv")


# -- QA fixes: --batch-size none, non-finite runs, --out over an earlier run, --lr 0, help --

def test_batch_size_none_overrides_the_spec_to_full_batch(tmp_path, capsys):
    spec_path = tmp_path / "s.json"
    spec_path.write_text(json.dumps(small_spec(steps=3).to_dict()))
    parser = cli.build_parser()
    for word in ("none", "None", "NONE"):
        spec, _ = cli_train.build_spec(parser.parse_args(
            ["train", "--spec", str(spec_path), "--batch-size", word]))
        assert spec.batch_size is None and small_spec().batch_size == 16
    spec, _ = cli_train.build_spec(parser.parse_args(
        ["train", "--spec", str(spec_path), "--batch-size", "8"]))
    assert spec.batch_size == 8
    out = tmp_path / "o"
    assert cli.main(["train", "--spec", str(spec_path), "--batch-size", "none", "--out", str(out),
                     "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["spec"]["batch_size"] is None
    assert cli.main(["train", "--spec", str(spec_path), "--batch-size", "nothing"]) == 2
    assert "--batch-size: expected an integer >= 1" in capsys.readouterr().err


def test_nonfinite_run_is_reported_without_warnings(tmp_path, capsys):
    spec_path = tmp_path / "e.json"
    spec_path.write_text(json.dumps({"sizes": [2, 8, 1], "activation": "tanh", "data": "xor",
                                     "steps": 12, "optimizer": {"name": "sgd", "lr": 1e30}}))
    out = tmp_path / "d"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's inf − inf warning fails the test
        assert cli.main(["train", "--spec", str(spec_path), "--out", str(out)]) == 0
    res = capsys.readouterr()
    assert res.err == ""
    summary = json.loads((out / "summary.json").read_text())
    k = summary["first_nonfinite_step"]
    assert k is not None and 0 < k < 12
    assert summary["first_nonfinite_step_manual"] == summary["first_nonfinite_step_twin"] == k
    assert summary["status"] == f"completed (non-finite from step {k})"
    assert f"non-finite (NaN/inf) from step {k} on both sides, identically" in summary["nonfinite"]
    assert f"completed (non-finite from step {k})" in res.out and "on both sides" in res.out
    assert summary["tier"] == "bitwise"  # agreement stays honest: NaN at the same steps
    # a finite run says nothing of the kind
    fine = train_mod.train(small_spec(steps=3), None, progress=False)
    assert fine["status"] == "completed" and fine["nonfinite"] is None
    need_matplotlib()
    from matplotlib.figure import Figure
    drawn = []
    real = Figure.savefig
    monkey = pytest.MonkeyPatch()
    monkey.setattr(Figure, "savefig",
                   lambda fig, *a, **kw: (drawn.append(fig), real(fig, *a, **kw))[1])
    try:
        run_outputs.write_outputs(str(out), Spec.from_dict(summary["spec"]), summary,
                                  *_losses_of(out), None, torch.zeros(1, 3), torch.zeros(1, 1))
    finally:
        monkey.undo()
    top = drawn[0].axes[0]
    assert f"non-finite from step {k} on both sides" in top.get_title()
    assert f"{k}/{k} finite steps identical" in top.get_title()
    assert "12/12" not in top.get_title()
    assert any(list(line.get_xdata()) == [k, k] for line in top.get_lines())
    assert any(f"from step {k}" in t.get_text() for t in top.texts)


def _losses_of(out):
    rows = [line.split(",") for line in read_csv(out / "losses.csv")[1:]]
    return (torch.tensor([float(r[1]) for r in rows], dtype=torch.float64),
            torch.tensor([float(r[2]) for r in rows], dtype=torch.float64))


def test_out_refuses_an_earlier_run_unless_force_or_resume(tmp_path, capsys):
    out = str(tmp_path / "r")
    base = ["train", "--example", "xor", "--steps", "5", "--device", "cpu", "--quiet"]
    assert cli.main(base + ["--out", out]) == 0
    before = read_csv(os.path.join(out, "losses.csv"))
    capsys.readouterr()
    assert cli.main(base + ["--out", out, "--lr", "0.3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"refnet: error: --out: {out} already holds a run")
    assert "--force" in err[0] and read_csv(os.path.join(out, "losses.csv")) == before
    for name in ("summary.json", "losses.csv"):  # any one of the run's files is enough
        other = tmp_path / name.split(".")[0]
        other.mkdir()
        (other / name).write_text("x")
        assert cli.main(base + ["--out", str(other)]) == 2
        assert "already holds a run" in capsys.readouterr().err
    assert cli.main(base + ["--out", out, "--lr", "0.3", "--force"]) == 0
    assert read_csv(os.path.join(out, "losses.csv")) != before
    assert cli.main(["train", "--resume", out, "--out", out, "--steps", "8", "--quiet"]) == 0
    assert len(read_csv(os.path.join(out, "losses.csv"))) == 9
    (tmp_path / "empty").mkdir()
    assert cli.main(base + ["--out", str(tmp_path / "empty")]) == 0


def test_lr_accepts_zero_and_help_tells_the_truth(tmp_path, capsys):
    out = tmp_path / "z"
    assert cli.main(["train", "--example", "xor", "--steps", "3", "--device", "cpu", "--lr", "0",
                     "--out", str(out), "--quiet"]) == 0
    losses = _losses_of(out)[0]
    assert json.loads((out / "summary.json").read_text())["spec"]["optimizer"]["lr"] == 0
    assert bool((losses == losses[0]).all())  # lr 0: the parameters never move
    for bad in ("-1", "nan", "inf", "x"):
        assert cli.main(["train", "--example", "xor", "--lr", bad]) == 2
        assert f"--lr: expected a finite number >= 0, got {bad!r}" in capsys.readouterr().err
    text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["train"]
                    .format_help().split())
    assert "refnet/not_bitwise.py" in text and "--force" in text
    assert "without --out nothing is written" in text


# -- one registry: every example name means one net for every verb --

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_verify_and_train_build_the_same_spec_for_every_example(dtype):
    from refnet import report
    parser = cli.build_parser()
    names = examples.trainable()
    assert {"xor", "circles", "two_layer_seed", "spiral", "random", "makemore_ninja"} <= set(names)
    for name in names:
        if dtype not in examples.get(name).dtypes:   # autocast examples: float32 only, refused
            with pytest.raises(ValueError, match=f"needs dtype float32.*got dtype {dtype}"):
                cli_train.build_spec(parser.parse_args(
                    ["train", "--example", name, "--device", "cpu", "--dtype", dtype]))
            continue
        for_verify = report.example_spec(name, "cpu", dtype)
        for_train, example = cli_train.build_spec(parser.parse_args(
            ["train", "--example", name, "--device", "cpu", "--dtype", dtype]))
        assert example == name
        assert for_verify.to_dict() == for_train.to_dict(), name


def test_verify_report_carries_the_spec_train_trains(tmp_path, capsys):
    report_path = tmp_path / "r.json"
    assert cli.main(["verify", "--example", "xor", "--device", "cpu", "--dtype", "float64",
                     "--json", str(report_path), "--quiet"]) == 0
    rows = json.loads(report_path.read_text())["results"]
    out = tmp_path / "t"
    assert cli.main(["train", "--example", "xor", "--device", "cpu", "--out", str(out),
                     "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert rows and all(r["spec"] == summary["spec"] for r in rows)
    assert summary["spec"]["name"] == "xor_mlp_tanh" and summary["spec"]["sizes"] == [2, 4, 1]
    # examples that train no MLP report no spec
    assert cli.main(["verify", "--example", "scalar_graph", "--device", "cpu", "--dtype",
                     "float64", "--json", str(report_path), "--quiet"]) == 0
    assert all(r["spec"] is None for r in json.loads(report_path.read_text())["results"])
    # a spec's report carries the spec it ran, on each device/dtype
    spec_path = tmp_path / "s.json"
    spec_path.write_text(json.dumps(small_spec(steps=3).to_dict()))
    assert cli.main(["verify", "--spec", str(spec_path), "--dtype", "all", "--json",
                     str(report_path), "--quiet"]) == 0
    rows = json.loads(report_path.read_text())["results"]
    assert {r["spec"]["dtype"] for r in rows} == {"float32", "float64"}
    assert all(r["spec"]["dtype"] == r["dtype"] and r["spec"]["name"] == "small" for r in rows)


def test_quiet_train_prints_the_summary_line(tmp_path, capsys):
    assert cli.main(["train", "--example", "xor", "--steps", "5", "--device", "cpu",
                     "--quiet"]) == 0
    res = capsys.readouterr()
    lines = res.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xor_mlp_tanh: 5 steps on cpu/float64")
    assert "tier bitwise" in lines[0] and res.err == ""


def test_resume_with_a_changed_setting_is_refused_before_any_process_starts(tmp_path, capsys):
    """--resume checks the spec in build_spec, so `--nproc` (which never reaches train()) refuses a
    changed --lr in one line too, instead of diverging mid-run."""
    out = tmp_path / "run"
    assert cli.main(["train", "--example", "xor", "--steps", "4", "--out", str(out),
                     "--quiet"]) == 0
    capsys.readouterr()
    for extra in ([], ["--nproc", "2"]):
        assert cli.main(["train", "--resume", str(out), "--steps", "8", "--lr", "0.9",
                         *extra]) == 2
        err = capsys.readouterr().err
        assert "--resume:" in err and "must keep it" in err and err.count("\n") == 1, err
