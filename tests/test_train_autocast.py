"""Autocast and the GradScaler in the training loop (issue 23): `train` and `verify --spec` run
manual.autocast / manual.grad_scaler against the stock script in lockstep; the scaler's state is
in the checkpoint, so an interrupted fp16 run resumes bitwise, skipped steps included."""
import json
import signal

import pytest

from refnet import cli, harness, train as train_mod
from refnet.checkpoint import load_checkpoint, state_differences
from refnet.data import load_data
from refnet.examples.mixed_precision import circles_fp16_spec, spiral_bf16_spec
from refnet.spec import Spec


def fp16(**over):
    return Spec(**{**circles_fp16_spec().to_dict(), "steps": 14, **over})


def test_fp16_scaler_run_resumed_is_bitwise_skips_included(tmp_path):
    straight = train_mod.train(fp16(), tmp_path / "straight", check_every=3)
    assert straight["status"] == "completed" and straight["tier"] == "bitwise"
    scaler = straight["grad_scaler"]
    assert scaler["skipped_steps"][:3] == [0, 1, 2] and scaler["same_skips_both_sides"]
    assert scaler["scale_history"][0] == [0, 2.0 ** 30] and scaler["scale_history"][1] == [1, 2.0 ** 29]

    def cut_at_4(step, loss_m, loss_t):
        if step == 4:
            signal.raise_signal(signal.SIGINT)

    cut = train_mod.train(fp16(), tmp_path / "cut", check_every=3, on_step=cut_at_4)
    assert cut["status"] == "interrupted" and cut["last_checkpoint"] == 5   # mid-overflow streak
    resumed = train_mod.train(None, tmp_path / "cut", check_every=3, resume=tmp_path / "cut")
    assert resumed["status"] == "completed" and resumed["grad_scaler"] == scaler
    assert (tmp_path / "cut" / "losses.csv").read_text() == \
        (tmp_path / "straight" / "losses.csv").read_text()
    assert state_differences(load_checkpoint(tmp_path / "straight"),
                             load_checkpoint(tmp_path / "cut")) == []


def test_verify_spec_bf16_grades_the_autocast_step():
    spec = Spec(**{**spiral_bf16_spec().to_dict(), "steps": 8})
    x, target = load_data(spec)
    checks = harness.twin_checks(spec, x, target, strict_bits=True)
    assert all(c.passed and c.tier == "bitwise" for c in checks)
    # the gradients at init are autocast's: not the float32 step's
    pair = harness.build_pair(spec)
    amp = harness.gradient_checks(pair, x, target)
    plain = harness.build_pair(Spec(**{**spec.to_dict(), "autocast": None}))
    loss_plain, _ = plain.mlp.forward(x, target)
    assert amp[0].name == "loss" and float(pair.amp.forward(x, target)[0]) != float(loss_plain)


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_train_runs_accumulation_and_clipping_under_the_scaler_bitwise(tmp_path):
    """accumulate and clip_grad_norm with fp16 autocast and a GradScaler through `train`: the
    overflow steps skipped alike (their total norm inf or NaN on both sides), bitwise."""
    spec = fp16(steps=16, accumulate=2, clip_grad_norm={"max_norm": 0.05})
    summary = train_mod.train(spec, tmp_path / "run", check_every=5)
    assert summary["status"] == "completed" and summary["tier"] == "bitwise", summary
    skipped = summary["grad_scaler"]["skipped_steps"]
    assert skipped[:3] == [0, 1, 2] and len(skipped) < 16
    assert summary["grad_scaler"]["same_skips_both_sides"]
    clipping = summary["clipping"]   # the skipped steps clipped nothing: counted apart
    assert clipping["steps"] == 16 - len(skipped) and 0 < clipping["max_total_norm"] < 1e3


def test_nproc_runs_autocast_with_accumulation_clipping_and_a_norm(tmp_path, capsys):
    """--nproc 2 under fp16 autocast with a scaler growing by 1.5, 2 micro-batches per step, a
    layer norm and clipping: the manual gradients summed over the micro-batches, averaged over
    the ranks, then unscaled and clipped.  Bitwise, every step's gradients included.  (The DDP
    twin's first micro-batch runs under no_sync; dropping that is not visible here: float32
    sums of a few float16-precision gradients are exact, so the all-reduce order does not show.)"""
    spec = fp16(steps=10, accumulate=2, norm="layernorm", clip_grad_norm={"max_norm": 0.05},
                grad_scaler={"init_scale": 2.0 ** 20, "growth_interval": 2, "growth_factor": 1.5})
    path = tmp_path / "s.json"
    path.write_text(json.dumps(spec.to_dict()))
    code = cli.main(["train", "--spec", str(path), "--nproc", "2", "--out", str(tmp_path / "out"),
                     "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "on 2 processes" in out and "tier bitwise" in out, out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    skipped = summary["grad_scaler"]["skipped_steps"]
    assert skipped and len(skipped) < 10 and summary["clipping"]["clipped_steps"] > 0, summary


def test_train_cli_says_how_many_steps_the_scaler_skipped(tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(fp16(steps=6).to_dict()))
    code = cli.main(["train", "--spec", str(path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and ", scaler skipped 6 steps (both sides alike), final scale 3.35544e+07" in out


def test_a_skipped_first_step_under_a_schedule_shows_no_scheduler_warning(recwarn):
    """A scaler that skips step 0 makes torch's scheduler warn "lr_scheduler.step() before
    optimizer.step()" (it counts opt.step calls); the harness keeps that out of the output while
    the rates stay graded every step (bitwise here)."""
    spec = fp16(steps=4, lr_schedule={"name": "cosine", "min_lr": 0.0})
    pair = harness.build_pair(spec)
    x, y = load_data(spec)
    outs = []
    verdicts = harness.curve_checks(pair, x, y, spec.steps, spec.batch_size, spec.seed,
                                    record=outs)[0]
    assert not outs[0].stepped_m and all(v.tier == "bitwise" for v in verdicts)
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
