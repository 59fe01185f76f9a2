"""Data-parallel manual backprop vs DistributedDataParallel (gloo on CPU, world sizes 2, 3, 4).

Every test spawns its ranks through refnet.dp_launch.launch, which kills whatever is still alive
in a `finally`, so a failing test leaves no process behind.  One torch thread per rank.
"""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from manual.data_parallel import FIRST_BUCKET_BYTES, assign_buckets, ready_order
from refnet import dp_launch
from refnet.dp_pair import DPPair, RankFailed
from refnet.dp_specs import bn_dp_spec, dp_specs
from verify._dp_faults import KillAt, PerturbData, RaiseAt
from refnet.checkpoint import load_checkpoint, state_differences
from refnet.cli import main
from refnet.spec import Spec

STEPS = 4


def _verify_job(world_size, specs):
    return dp_launch.launch({"mode": "verify", "device": "cpu",
                             "specs": [s.to_dict() for s in specs]}, world_size)


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


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batchnorm_and_dropout_dp_bitwise_to_ddp(dtype):
    # per-rank batch statistics (no SyncBatchNorm); rank 0's running statistics broadcast before
    # every forward on both sides (DDP's broadcast_buffers); each rank's dropout stream
    spec = bn_dp_spec(dtype, steps=STEPS)
    [(name, _device, _dtype, checks)] = _verify_job(2, [spec])
    names = {c.name for c in checks}
    for kind in ("reduced_grads", f"loss_curve[{STEPS}]", "final_params", "ranks_identical"):
        assert f"dp2.{kind}" in names
    for check in checks:
        assert check.name.startswith("dp2."), check.name   # no vs-single: another function
        assert check.tier == "bitwise" and check.passed, (name, check.failures())


def test_batchnorm_shard_of_one_row_is_refused():
    spec = bn_dp_spec(steps=STEPS)
    fake = SimpleNamespace(spec=spec, world_size=2, rank=1)
    with pytest.raises(ValueError, match="^batch_size: batch norm normalizes each rank's shard"):
        DPPair.shard(fake, torch.arange(3), 3)
    assert DPPair.shard(fake, torch.arange(4), 4).tolist() == [2, 3]


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


def _train_job(out, spec, resume=None, hook=None):
    return {"mode": "train", "device": "cpu", "spec": spec.to_dict(), "example": None,
            "out": str(out), "resume": resume, "check_every": 3, "tier": None, "test_hook": hook}


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
