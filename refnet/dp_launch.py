"""Start N data-parallel processes (or join torchrun's), run a job on each, and fail cleanly.

`refnet train|verify|bench --nproc N` (refnet/cli/dp.py builds the job) spawns N processes here
with a FileStore rendezvous in a temporary folder.  Under `torchrun --nproc-per-node N [--nnodes M --node-rank K
--rdzv-endpoint HOST:PORT] -m refnet …` the current process is one rank (env:// rendezvous).

Faults: every collective times out after TIMEOUT_S (the process group's timeout).  When a spawned
rank exits abnormally (an exception or a signal), the launcher waits at most TIMEOUT_S + GRACE_S
for the others to fail on their own (a closed connection usually ends them at once), kills what
is left, and raises RankFailed with one line naming the rank.  Rank 0 writes checkpoints
atomically, so a failure leaves the last complete checkpoint to --resume from.
"""
import datetime
import os
import pickle
import shutil
import signal
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from refnet import bench_dp, dp_train
from refnet.dp_pair import TIMEOUT_S, RankFailed, backend_for
from refnet.dp_verify import verify_spec
from refnet.spec import Spec
from refnet.settings import determinism

GRACE_S = 5


def under_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _init(rank, world_size, device, init_method, timeout_s):
    torch.set_num_threads(1)  # N ranks share the cores; one thread each
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))


def _work(rank, world_size, job):
    """The job on this rank, inside the process group; rank 0's result."""
    if job["mode"] == "verify":
        results = []
        for raw in job["specs"]:
            spec = Spec.from_dict(raw[rank] if isinstance(raw, list) else raw)
            with determinism(spec.device):
                checks = verify_spec(spec, rank, world_size, job)
            results.append((spec.name, spec.device, spec.dtype, checks))
        return results
    if job["mode"] == "train":
        with determinism(job["spec"]["device"]):
            return dp_train.train_worker(rank, world_size, job)
    if job["mode"] == "bench":
        return bench_dp.bench_worker(rank, world_size, job)
    raise ValueError(f"job mode: expected verify, train or bench, got {job['mode']!r}")


def _entry(rank, world_size, job, folder, timeout_s):
    """One spawned rank: run the job, leave rank 0's result or this rank's one-line error."""
    code = 0
    try:
        _init(rank, world_size, job["device"], f"file://{os.path.join(folder, 'store')}", timeout_s)
        result = _work(rank, world_size, job)
        if rank == 0:
            with open(os.path.join(folder, "result.pkl"), "wb") as f:
                pickle.dump(result, f)
    except BaseException as exc:  # noqa: BLE001 -- reported as one line, then a nonzero exit
        line = " ".join(f"{exc.__class__.__name__}: {exc}".split())[:400]
        with open(os.path.join(folder, f"rank{rank}.err"), "w") as f:
            f.write(line)
        if os.environ.get("REFNET_DP_TRACEBACK"):
            traceback.print_exc()
        code = 2 if isinstance(exc, (ValueError, TypeError)) else 1
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 -- a broken group cannot be torn down cleanly
                pass
    os._exit(code)  # skip interpreter teardown: a dead peer must not make exit hang


def _why(exitcode):
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _context():
    """forkserver with torch and refnet imported once: each rank then starts in milliseconds
    instead of re-importing torch (seconds); spawn where forkserver does not exist (Windows)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["refnet.dp_launch"])
    return ctx


def launch(job, nproc, timeout_s=None):
    """Run job on nproc spawned ranks; rank 0's result, or RankFailed / ValueError (one line)."""
    timeout_s = timeout_s or TIMEOUT_S
    ctx = _context()
    folder = tempfile.mkdtemp(prefix="refnet-dp-")
    procs = []
    try:
        for rank in range(nproc):
            p = ctx.Process(target=_entry, args=(rank, nproc, job, folder, timeout_s))
            p.start()
            procs.append(p)
        failed, deadline = False, None
        while any(p.is_alive() for p in procs):
            if not failed:
                if any(p.exitcode not in (None, 0) for p in procs):
                    failed, deadline = True, time.time() + timeout_s + GRACE_S
            elif time.time() > deadline:
                break
            time.sleep(0.05)
        bad = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if bad:
            raise _failure(folder, procs, _root_cause(folder, procs, bad))
        with open(os.path.join(folder, "result.pkl"), "rb") as f:
            return pickle.load(f)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


# A rank whose peer died fails too, within the same poll, with a transport error ("Connection
# reset by peer", a timed-out collective): those are consequences, not the cause.
_PEER_ERRORS = ("Connection reset", "Connection closed", "Broken pipe", "DistBackendError",
                "timed out", "Timed out", "gloo", "NCCL")


def _root_cause(folder, procs, bad):
    """The failed rank to name: one killed by a signal, else one whose error is its own (not a
    peer's death seen through a collective), else the lowest rank."""
    def rank_key(r):
        if procs[r].exitcode < 0:
            return (0, r)
        path = os.path.join(folder, f"rank{r}.err")
        msg = open(path).read() if os.path.exists(path) else ""
        return (2 if any(e in msg for e in _PEER_ERRORS) else 1, r)
    return min(bad, key=rank_key)


def _failure(folder, procs, first):
    """One line: which rank failed first and why (its own message when it left one)."""
    def err(r):
        path = os.path.join(folder, f"rank{r}.err")
        return open(path).read().strip() if os.path.exists(path) else None
    msg, code = err(first), procs[first].exitcode
    if msg and code == 2:  # a usage error the same on every rank (spec, --nproc, data mismatch)
        return ValueError(msg.split(": ", 1)[1] if ": " in msg else msg)
    others = [r for r in range(len(procs)) if r != first]
    return RankFailed(
        f"rank {first} of {len(procs)} failed ({_why(code)}{': ' + msg if msg else ''}); "
        f"ranks {', '.join(map(str, others))} stopped")


def run_job(job, nproc):
    """Spawn nproc ranks here, or, under torchrun, be one rank; rank 0's result (others: None)."""
    if not under_torchrun():
        return launch(job, nproc)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if nproc and nproc != world_size:
        raise ValueError(f"--nproc: {nproc} given but torchrun started {world_size} processes; "
                         f"drop --nproc under torchrun or make them agree")
    _init(rank, world_size, job["device"], "env://", TIMEOUT_S)
    try:
        result = _work(rank, world_size, job)
    except (ValueError, TypeError):
        raise
    except Exception as exc:  # a collective failed: a peer died or timed out
        raise RankFailed(f"rank {rank}: {' '.join(str(exc).split())[:300]}") from None
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 -- a broken group cannot be torn down cleanly
            pass
    return result if rank == 0 else None

