"""Data-parallel manual backprop vs DistributedDataParallel (gloo on CPU, world sizes 2, 3, 4).

Every test spawns its ranks through refnet.dp_launch.launch, which kills whatever is still alive
in a `finally`, so a failing test leaves no process behind.  One torch thread per rank.  The
tests give every collective TEST_TIMEOUT_S, not the CLI's 30 s (refnet.dp_pair.TIMEOUT_S): on a
loaded machine one rank may be descheduled for long enough that a peer's collective would time
out on a healthy job; a dead rank still ends its peers at once (the closed connection).
"""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from manual.data_parallel import FIRST_BUCKET_BYTES, assign_buckets, ready_order
from refnet import dp_launch, harness
from refnet.data import load_data
from refnet.dp_pair import DPPair, RankFailed
from refnet.dp_specs import (autocast_dp_specs, bn_dp_spec, dp_specs, embedding_dp_specs,
                             step_key_dp_specs)
from verify._dp_faults import KillAt, PerturbData, RaiseAt
from refnet.checkpoint import load_checkpoint, state_differences
from refnet.cli import main
from refnet.spec import Spec

STEPS = 4
TEST_TIMEOUT_S = 120


def _verify_job(world_size, specs):
    return dp_launch.launch({"mode": "verify", "device": "cpu",
                             "specs": [s.to_dict() for s in specs]}, world_size, TEST_TIMEOUT_S)


def _assert_dp_bitwise(results, world_size, specs, extra=()):
    """Every manual-DP-vs-DDP row bitwise (reduced gradients, losses, final parameters, and
    `extra` curves such as lr_curve) on every rank; the parameters identical on every rank."""
    assert [r[0] for r in results] == [s.name for s in specs]
    for (name, _device, dtype, checks), spec in zip(results, specs):
        dp_rows = [c for c in checks if c.name.startswith(f"dp{world_size}.")]
        assert {c.name for c in dp_rows} == {f"dp{world_size}.{kind}" for kind in (
            "reduced_grads", f"loss_curve[{spec.steps}]", "final_params", "ranks_identical")}
        for check in dp_rows:
            assert check.tier == "bitwise" and check.passed, (name, dtype, check.failures())
        verdicts = {v.name for c in dp_rows for v in c.verdicts}
        for curve in extra(spec) if callable(extra) else extra:
            assert f"rank{world_size - 1}.{curve}" in verdicts, (name, curve)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_manual_dp_bitwise_to_ddp(world_size):
    specs = [s for dt in ("float32", "float64") for s in dp_specs(dt, steps=STEPS)]
    results = _verify_job(world_size, specs)
    assert len(results) == len(specs)
    seen = set()
    for name, _device, dtype, checks in results:
        for check in checks:
            seen.add((name, dtype, check.name))
            if check.name.startswith(f"dp{world_size}."):
                # per-step reduced gradients, per-step losses, final parameters on every rank;
                # parameters identical across ranks
                assert check.tier == "bitwise" and check.passed, (name, dtype, check.failures())
            else:  # manual DP vs one process on the whole batch: graded (docs/data-parallel.md)
                assert check.name.startswith(f"dp{world_size}_vs_single"), check.name
                assert check.passed and check.tier in ("bitwise", "ulp", "tolerance")
    for s in specs:
        for kind in ("reduced_grads", f"loss_curve[{STEPS}]", "final_params", "ranks_identical"):
            assert (s.name, s.dtype, f"dp{world_size}.{kind}") in seen


@pytest.mark.parametrize("world_size", [2, 3])
def test_batchnorm_and_dropout_dp_bitwise_to_ddp(world_size):
    # per-rank batch statistics (no SyncBatchNorm); rank 0's running statistics broadcast before
    # every forward on both sides (DDP's broadcast_buffers); each rank's dropout stream.  N = 3:
    # the norm layers' gradients sit between their linear layers' in the rebuilt bucket
    # (ready_order); with them first, 2754 of 7830 float32 gradient elements differed.
    specs = [bn_dp_spec(dtype, steps=STEPS) for dtype in ("float32", "float64")]
    results = _verify_job(world_size, specs)
    _assert_dp_bitwise(results, world_size, specs)
    for _name, _device, _dtype, checks in results:   # no vs-single: another function
        assert all(c.name.startswith(f"dp{world_size}.") for c in checks)


def test_batchnorm_shard_of_one_row_is_refused():
    spec = bn_dp_spec(steps=STEPS)
    fake = SimpleNamespace(spec=spec, world_size=2, rank=1)
    with pytest.raises(ValueError, match="^batch_size: batch norm normalizes each rank's shard"):
        DPPair.shard(fake, torch.arange(3), 3)
    assert DPPair.shard(fake, torch.arange(4), 4).tolist() == [2, 3]


def _autograd_ready_order(spec):
    """The order the twin's gradients become ready in one backward (autocast when the spec has
    it): post-accumulate-grad hooks, the point DDP's reducer hooks into."""
    pair = harness.build_pair(spec)
    seen = []
    for name, p in pair.twin.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, name=name: seen.append(name))
    x, target = load_data(spec)
    with torch.autocast("cpu", dtype=spec.autocast_dtype, enabled=spec.autocast is not None):
        loss = pair.twin_loss(pair.twin(x[:8]), target[:8])
    loss.backward()
    return seen


@pytest.mark.parametrize("over", [
    {}, {"bias": False}, {"norm": "batchnorm"}, {"norm": "layernorm"},
    {"autocast": "bfloat16"}, {"autocast": "float16", "bias": False},
    {"sizes": [8, 16, 27], "data": "names", "embedding": {"vocab": 27, "dim": 4, "context": 2}},
    {"sizes": [8, 16, 27], "data": "names", "embedding": {"vocab": 27, "dim": 4, "context": 2},
     "autocast": "bfloat16"}], ids=str)
def test_ready_order_is_autograds(over):
    """manual.data_parallel.ready_order (the rebuilt buckets' order) is the order autograd
    readies the twin's gradients: a norm's between its linear layers, weight before bias under
    autocast, embed.weight last."""
    spec = Spec(**{**dict(sizes=[2, 16, 16, 3], activation="tanh", loss="cross_entropy",
                          data="spiral", n_samples=24, dtype="float32"), **over})
    names = list(harness.build_pair(spec).mlp.params)
    assert ready_order(names, spec.autocast is not None) == _autograd_ready_order(spec)


def test_bucket_assignment_and_ready_order():
    names = ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    assert ready_order(names) == names[::-1]
    nbytes = {"layers.0.weight": FIRST_BUCKET_BYTES, "layers.0.bias": 8,
              "layers.1.weight": 800, "layers.1.bias": 8}
    # the first bucket closes once it reaches 1 MiB; the rest share the 25 MiB bucket
    assert assign_buckets(names, nbytes, [FIRST_BUCKET_BYTES, 25 << 20]) == \
        [["layers.0.weight"], ["layers.0.bias", "layers.1.weight", "layers.1.bias"]]
    assert assign_buckets(names[::-1], nbytes, [16, 25 << 20]) == \
        [["layers.1.bias", "layers.1.weight"], ["layers.0.bias", "layers.0.weight"]]


def _small_spec(**kw):
    raw = dict(sizes=[2, 16, 3], activation="relu", loss="cross_entropy", data="spiral",
               n_samples=60, batch_size=20, optimizer={"name": "adam", "lr": 0.01}, steps=8,
               name="dp_train")
    raw.update(kw)
    return Spec(**raw)


def _train_job(out, spec, resume=None, hook=None, check_every=3):
    return {"mode": "train", "device": "cpu", "spec": spec.to_dict(), "example": None,
            "out": str(out), "resume": resume, "check_every": check_every, "tier": None,
            "test_hook": hook}


def test_kill_one_rank_then_resume_bitwise(tmp_path):
    # N = 3: the bucket order decides bits, so resuming must restore DDP's rebuilt buckets
    spec = _small_spec()
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir()
    broken.mkdir()
    summary = dp_launch.launch(_train_job(whole, spec), 3)
    assert summary["status"] == "completed" and summary["tier"] == "bitwise"
    with pytest.raises(RankFailed) as info:   # (no timed assertion: a loaded machine is slow)
        dp_launch.launch(_train_job(broken, spec, hook=KillAt(1, 5)), 3)
    msg = str(info.value)
    assert "rank 1 of 3 failed (killed by SIGKILL); ranks 0, 2 stopped" == msg, msg
    # the last complete checkpoint (step 3) is intact; no temporary file is left behind
    ck = load_checkpoint(str(broken))
    assert ck["step"] == 3 and ck["world_size"] == 3
    assert not [f for f in os.listdir(broken) if f.endswith(".tmp")]
    resumed = dp_launch.launch(_train_job(broken, spec, resume=str(broken)), 3)
    assert resumed["resumed_from"] == 3 and resumed["status"] == "completed"
    assert resumed["tier"] == "bitwise"  # manual DP vs DDP
    assert (broken / "losses.csv").read_text() == (whole / "losses.csv").read_text()
    a, b = load_checkpoint(str(whole)), load_checkpoint(str(broken))
    for side in ("manual_params", "twin_params"):
        for name, p in a[side].items():
            assert torch.equal(p, b[side][name]), (side, name)
    # another N is refused with one line, before any process starts
    rc = main(["train", "--resume", str(broken), "--nproc", "2", "--steps", "12", "--quiet"])
    assert rc == 2
    # and so is one process (no --nproc): the loop is the same, the checkpoint says 3
    assert main(["train", "--resume", str(broken), "--steps", "12", "--quiet"]) == 2


def test_resume_with_dropout_batchnorm_momentum_on_uneven_shards_bitwise(tmp_path):
    """Every piece of state a data-parallel checkpoint carries survives a resume: 25-row batches
    over 2 ranks are shards of 13 and 12 rows, so rank 1 draws fewer dropout numbers than rank 0
    and its stream must be its own on resume (the checkpoint keeps every rank's); batch norm's
    running statistics and the momentum buffers too.  The resumed run equals the unbroken one
    bitwise, on both sides.  (N = 2: batch norm nets on N >= 3 are not bitwise to DDP yet.)"""
    def spec(steps):
        return _small_spec(steps=steps, batch_size=25, norm="batchnorm", dropout=0.2,
                           optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9})
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir()
    cut.mkdir()
    summary = dp_launch.launch(_train_job(whole, spec(7)), 2)
    assert summary["status"] == "completed" and summary["tier"] == "bitwise"
    dp_launch.launch(_train_job(cut, spec(4)), 2)
    streams = load_checkpoint(str(cut))["rank_streams"]
    assert len(streams) == 2 and not torch.equal(streams[0]["manual_rng"], streams[1]["manual_rng"])
    resumed = dp_launch.launch(_train_job(cut, spec(7), resume=str(cut)), 2)
    assert resumed["resumed_from"] == 4 and resumed["tier"] == "bitwise"
    assert (cut / "losses.csv").read_text() == (whole / "losses.csv").read_text()
    assert state_differences(load_checkpoint(str(whole)), load_checkpoint(str(cut))) == []


def test_raising_rank_names_itself(tmp_path):
    with pytest.raises(RankFailed, match=r"rank 0 of 2 failed .*injected failure"):
        dp_launch.launch(_train_job(tmp_path, _small_spec(steps=4), hook=RaiseAt(0, 1)), 2)


def test_mismatched_spec_and_data_detected_at_start():
    a, b = _small_spec(steps=2), _small_spec(steps=2, optimizer={"name": "adam", "lr": 0.02})
    with pytest.raises(ValueError, match="rank 1 has a different spec than rank 0"):
        dp_launch.launch({"mode": "verify", "device": "cpu",
                          "specs": [[a.to_dict(), b.to_dict()]]}, 2)
    with pytest.raises(ValueError, match="rank 1 has a different data than rank 0"):
        dp_launch.launch({"mode": "verify", "device": "cpu", "specs": [a.to_dict()],
                          "test_hook": PerturbData(1)}, 2)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_nccl_two_gpus():
    results = _verify_job(2, dp_specs("float64", device="cuda", steps=STEPS))
    for _name, _device, _dtype, checks in results:
        for check in checks:
            assert check.passed, check.failures()


def test_cli_dispatches_nproc_once(tmp_path, monkeypatch, capsys):
    # refnet.cli.main sends --nproc to refnet/cli/dp.py; its report rows carry the spec
    spec = _small_spec(steps=2, batch_size=24)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(spec.to_dict()))
    out = tmp_path / "r.json"
    assert main(["verify", "--nproc", "2", "--spec", str(path), "--quiet", "--json", str(out)]) == 0
    assert "processes)" in capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert {r["check"] for r in rows} >= {"dp2.reduced_grads", "dp2.ranks_identical",
                                         "dp2_vs_single.grad@step0"}
    assert all(r["spec"]["name"] == "dp_train" and r["passed"] for r in rows)
    # under torchrun a verb that does not run data-parallel is one line, exit 2
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    assert main(["export", "--example", "xor", "--out", str(tmp_path / "e")]) == 2
    assert "export: does not run data-parallel" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    # one torch thread per rank: another count is refused, not silently ignored
    assert main(["verify", "--nproc", "2", "--spec", str(path), "--threads", "2"]) == 2
    assert "--threads: each data-parallel rank runs one torch thread" in capsys.readouterr().err


def test_the_failure_names_the_root_cause_not_a_peer_that_saw_it(tmp_path):
    """Rank 1 killed, rank 0 exits on the broken connection in the same poll: name rank 1."""
    from types import SimpleNamespace

    from refnet import dp_launch
    procs = [SimpleNamespace(exitcode=1), SimpleNamespace(exitcode=-9), SimpleNamespace(exitcode=1)]
    (tmp_path / "rank0.err").write_text("RuntimeError: [gloo/pair.cc:537] Read error: "
                                        "Connection reset by peer")
    (tmp_path / "rank2.err").write_text("ValueError: data: mismatch")
    assert dp_launch._root_cause(str(tmp_path), procs, [0, 1, 2]) == 1
    procs[1].exitcode = 0   # nobody killed: the rank with its own error, not the peer error
    assert dp_launch._root_cause(str(tmp_path), procs, [0, 2]) == 2
    (tmp_path / "rank2.err").write_text("RuntimeError: Connection closed by peer")
    assert dp_launch._root_cause(str(tmp_path), procs, [0, 2]) == 0


def _step_curves(spec):
    """The per-step curves a step-key spec adds to the DP rows (harness.step_curves)."""
    return (["lr_curve"] if spec.lr_schedule else []) + \
        (["clip_norm_curve"] if spec.clip_grad_norm else []) + \
        (["scale_curve", "skipped_steps"] if spec.grad_scaler else [])


@pytest.mark.parametrize("world_size", [2, 3])
def test_step_keys_dp_bitwise_to_ddp(world_size):
    """clip_grad_norm (2 and inf; after the all-reduce on both sides), warmup_cosine, accumulate
    2 and 3 (DDP: no_sync for the first k - 1 micro-batches; manual: the local sum reduced once),
    and the three together, float32 and float64: every rank bitwise, with the learning rates and
    the clip total norms of every step.  Measured with the mirror broken (float32, 4 steps, all
    ranks): clipping before the all-reduce changes every element; the twin all-reducing every
    micro-batch (no no_sync) changes 410 of 792 (N = 2, k = 2) and 783 of 1188 (N = 3)."""
    specs = [s for dtype in ("float32", "float64") for s in step_key_dp_specs(dtype, steps=STEPS)]
    _assert_dp_bitwise(_verify_job(world_size, specs), world_size, specs, _step_curves)


@pytest.mark.parametrize("world_size", [2, 3])
def test_autocast_dp_bitwise_to_ddp(world_size):
    """bf16 autocast, and fp16 with a GradScaler that skips an overflowing step: the float32
    gradients reduced in float32, the scaler's unscale and inf check after the all-reduce.  N = 3
    needs autocast's ready order (weight before bias): with the float32 one, 48 of 4452 bf16
    gradient elements differed (fp16: 195 of 6678)."""
    specs = autocast_dp_specs(steps=STEPS)
    _assert_dp_bitwise(_verify_job(world_size, specs), world_size, specs, _step_curves)


def test_embedding_dp_bitwise_to_ddp():
    """N = 3 (where the bucket layout decides bits): DDP's first bucket is the twin's
    parameters() order, embed.weight first.  With the manual dict's order (embed.weight last)
    444 (float32), 681 (float64) and 141 (bf16) of 8532 gradient elements differed."""
    specs = embedding_dp_specs(steps=STEPS)
    _assert_dp_bitwise(_verify_job(3, specs), 3, specs)


def _train_and_resume(tmp_path, spec, world_size, kill):
    """Train spec whole; train it again with rank 1 killed by `kill`, then resume from the last
    checkpoint.  -> (the whole run's summary, the resumed one's, both folders)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir()
    cut.mkdir()
    summary = dp_launch.launch(_train_job(whole, spec, check_every=2), world_size, TEST_TIMEOUT_S)
    assert summary["status"] == "completed" and summary["tier"] == "bitwise"
    with pytest.raises(RankFailed):
        dp_launch.launch(_train_job(cut, spec, hook=kill, check_every=2), world_size,
                         TEST_TIMEOUT_S)
    resumed = dp_launch.launch(_train_job(cut, spec, resume=str(cut), check_every=2),
                               world_size, TEST_TIMEOUT_S)
    assert resumed["status"] == "completed" and resumed["tier"] == "bitwise"
    assert (cut / "losses.csv").read_text() == (whole / "losses.csv").read_text()
    assert state_differences(load_checkpoint(str(whole)), load_checkpoint(str(cut))) == []
    return summary, resumed, whole, cut


def test_train_clip_accumulate_schedule_resumes_across_the_warmup_boundary_bitwise(tmp_path):
    """train --nproc 2 with clipping, accumulate 2 and warm-up (3 steps) + cosine: killed after
    step 3, resumed from the checkpoint at step 2, so the resumed run crosses into the cosine
    phase; losses.csv (losses, learning rates, clip norms) and the final state equal the
    unbroken run's."""
    spec = _small_spec(steps=6, batch_size=12, accumulate=2, clip_grad_norm={"max_norm": 0.25},
                       lr_schedule={"name": "warmup_cosine", "warmup_steps": 3, "min_lr": 1e-3})
    summary, resumed, whole, _ = _train_and_resume(tmp_path, spec, 2, KillAt(1, 3))
    assert resumed["resumed_from"] == 2 and summary["world_size"] == 2
    header, *rows = (whole / "losses.csv").read_text().splitlines()
    assert header.split(",")[4:] == ["lr", "clip_total_norm", "clip_coef"]
    coefs = [float(r.split(",")[6]) for r in rows]
    assert min(coefs) < 1 and max(coefs) == 1, coefs   # clipping active on some steps only


def test_train_fp16_scaler_on_three_ranks_resumes_bitwise(tmp_path):
    """train --nproc 3 with fp16 autocast, a GradScaler that skips a step, and warm-up + cosine:
    killed after step 3, resumed from step 2 (the scaler's scale and growth tracker from the
    checkpoint; DDP's buckets rebuilt in autocast's ready order), bitwise to the unbroken run."""
    spec = autocast_dp_specs(steps=6)[1]
    spec = Spec.from_dict({**spec.to_dict(), "lr_schedule": {"name": "warmup_cosine",
                                                             "warmup_steps": 2, "min_lr": 1e-3}})
    summary, resumed, _, _ = _train_and_resume(tmp_path, spec, 3, KillAt(1, 3))
    skipped = summary["grad_scaler"]["skipped_steps"]
    assert 0 < len(skipped) < spec.steps, skipped
    assert resumed["grad_scaler"]["skipped_steps"] == skipped
