"""The training step's keys in the loop (issue 24): clipping, accumulation and a warm-up + cosine
schedule through `verify --spec` (refnet.harness) and `train` (refnet.train, resume included),
both sides in lockstep, bitwise on CPU; the paths that do not carry the keys refuse them by name."""
import json
import signal

import pytest
import torch

import refnet
from refnet import cli, harness, train as train_mod
from refnet.checkpoint import load_checkpoint, state_differences
from refnet.data import load_data
from refnet.spec import Spec

CLIP = {"max_norm": 0.3}
SCHEDULE = {"name": "warmup_cosine", "warmup_steps": 3, "min_lr": 1e-4}


def combined(**over):
    """spiral, AdamW, warm-up 3 steps then cosine, clipping active on most steps, 2 micro-batches."""
    raw = dict(sizes=[2, 16, 16, 3], activation="tanh", loss="cross_entropy", data="spiral",
               n_samples=60, batch_size=10, accumulate=2, steps=12, dtype="float32",
               optimizer={"name": "adamw", "lr": 0.02}, clip_grad_norm=CLIP, lr_schedule=SCHEDULE,
               name="combined")
    return Spec(**{**raw, **over})


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_verify_spec_combined_is_bitwise_with_lr_and_norm_curves(dtype):
    spec = combined(dtype=dtype)
    x, target = load_data(spec)
    checks = harness.twin_checks(spec, x, target, strict_bits=True)
    names = [v.name for c in checks for v in c.verdicts]
    assert {"lr_curve", "clip_norm_curve"} <= set(names)
    for check in checks:
        assert check.passed and check.tier == "bitwise", (check.name, check.tier)


def test_each_step_uses_torchs_scheduled_rate_and_clips_like_clip_grad_norm(tmp_path):
    """losses.csv's lr column is the real LinearLR -> CosineAnnealingLR sequence; clipping is
    active on some steps and not on others; the twin's grads were divided by k (its loss is)."""
    spec = combined()
    summary = train_mod.train(spec, tmp_path, check_every=4)
    assert summary["status"] == "completed" and summary["tier"] == "bitwise"
    rows = [line.split(",") for line in (tmp_path / "losses.csv").read_text().splitlines()]
    assert rows[0][4:] == ["lr", "clip_total_norm", "clip_coef"]
    opt = torch.optim.AdamW([torch.zeros(1)], lr=0.02)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 1 / 3, 1.0, 3),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, 9, 1e-4)], [3])
    expected = []
    for _ in range(spec.steps):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [float(r[4]) for r in rows[1:]] == expected
    clipped = sum(float(r[6]) < 1 for r in rows[1:])
    assert summary["clipping"]["clipped_steps"] == clipped and 0 < clipped < spec.steps


def test_resume_across_the_warmup_boundary_is_bitwise(tmp_path):
    spec = combined()
    straight = train_mod.train(spec, tmp_path / "straight", check_every=2)

    def cut_at_1(step, loss_m, loss_t):
        if step == 1:
            signal.raise_signal(signal.SIGINT)

    cut = train_mod.train(spec, tmp_path / "cut", check_every=2, on_step=cut_at_1)
    assert cut["status"] == "interrupted" and cut["last_checkpoint"] == 2   # before warm-up ends
    resumed = train_mod.train(None, tmp_path / "cut", check_every=2, resume=tmp_path / "cut")
    assert resumed["status"] == "completed" and resumed["tier"] == "bitwise"
    assert resumed["clipping"] == straight["clipping"]
    assert (tmp_path / "cut" / "losses.csv").read_text() == \
        (tmp_path / "straight" / "losses.csv").read_text()
    assert state_differences(load_checkpoint(tmp_path / "straight"),
                             load_checkpoint(tmp_path / "cut")) == []


def test_a_scheduled_run_resumes_with_its_own_steps(tmp_path):
    train_mod.train(combined(steps=6), tmp_path, check_every=3)
    with pytest.raises(ValueError, match=r"^--steps: the lr_schedule spans the run's 6 steps"):
        train_mod.train(combined(steps=12), tmp_path, resume=tmp_path)


@pytest.mark.parametrize("over, message", [
    (dict(n_samples=15), "accumulate: 2 micro-batches of 10 rows need at least 20 rows; the "
                         "data set has 15"),
    (dict(batch_size=None), "accumulate: 2 micro-batches per step need a batch_size"),
])
def test_train_and_verify_refuse_in_one_line(tmp_path, capsys, over, message):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(combined(**over).to_dict()))
    for verb in (["verify", "--spec", path, "--dtype", "float32"],
                 ["train", "--spec", path, "--out", tmp_path / "out"]):
        code, _, err = run(capsys, *verb)
        assert code != 0 and err.strip().count("\n") == 0 and message in err, (verb, err)


@pytest.mark.parametrize("verb", [["train", "--nproc", "2", "--out", "OUT"],
                                  ["verify", "--nproc", "2"], ["export", "--out", "OUT"]])
def test_nproc_and_export_refuse_the_step_keys_by_name(tmp_path, capsys, verb):
    # --nproc carries clip_grad_norm, accumulate, lr_schedule and autocast
    # (verify/test_data_parallel.py); blocks it refuses by name, as export refuses lr_schedule
    path = tmp_path / "s.json"
    path.write_text(json.dumps(combined(accumulate=1, clip_grad_norm=None,
                                        blocks={"n": 1, "width": 16, "hidden": 8}).to_dict()))
    verb = [str(tmp_path / "out") if a == "OUT" else a for a in verb]
    where, key = ("--nproc", "blocks") if "--nproc" in verb else ("export", "lr_schedule")
    code, _, err = run(capsys, *verb[:1], "--spec", path, *verb[1:])
    assert code != 0 and err.strip().count("\n") == 0, err
    assert err.strip().endswith(f"{key}: {where} does not carry this key yet; remove it, or run "
                                f"the spec without {where}"), err


def test_check_training_refuses_micro_batches_but_takes_clipping_and_schedules():
    with pytest.raises(ValueError, match="^accumulate: check_training"):
        refnet.check_training(combined())
    assert refnet.check_training(combined(accumulate=1), tier="bitwise").verdict == "identical"


def test_train_cli_says_on_how_many_steps_clipping_was_active(tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(combined().to_dict()))
    code, out, _ = run(capsys, "train", "--spec", path, "--quiet")
    summary = train_mod.train(combined(), None)
    assert code == 0 and f", clipping active on {summary['clipping']['clipped_steps']} of 12 steps" in out
