"""`refnet train --nproc N`: the lockstep training run of refnet.train, data-parallel.

Every rank trains both sides on its shard of each global mini-batch; rank 0 alone writes
losses.csv (a column per side: the mean over ranks of the rank losses), summary.json, the plots
and the checkpoints, all atomically (refnet.run_outputs' writers, refnet.checkpoint).  The checkpoint records the
world size; resuming with another N is refused.  The parameters are identical on every rank
(checked at every check point), so rank 0's are the run's.
"""
import os
import time

import torch
import torch.distributed as dist

from refnet import data as datasets
from refnet import examples
from refnet import twin as twin_mod
from refnet.checkpoint import CHECKPOINT_NAME, load_checkpoint, restore_run, save_run
from refnet.compare import TIERS, compare_curves, compare_tensors
from refnet.distributed import DPPair, _data, _faults, _flat, check_same_everywhere
from refnet.spec import Spec
from refnet.run_outputs import run_summary, write_outputs
from refnet.train import default_tier


def train_worker(rank, world_size, job):
    """Train job["spec"] (a dict) on this rank; returns rank 0's summary (others: None)."""
    spec, example, out_dir = Spec.from_dict(job["spec"]), job.get("example"), job.get("out")
    check_every, tier = job.get("check_every", 50), job.get("tier") or default_tier(spec)
    ck = load_checkpoint(job["resume"]) if job.get("resume") else None
    if ck is not None and ck.get("world_size") != world_size:
        raise ValueError(f"--nproc: the checkpoint was trained on {ck.get('world_size')} "
                         f"processes; resume it with --nproc {ck.get('world_size')}, not "
                         f"{world_size}")
    if ck is not None and ck["step"] >= spec.steps:
        raise ValueError(f"--steps: the checkpoint is already at step {ck['step']}; give --steps "
                         f"larger than that to continue")
    started = time.time()
    x, target = _data(spec, example, rank, job)
    params = examples.get(example).initial_params(spec) if example is not None else None
    dp = DPPair(spec, rank, world_size, params)
    check_same_everywhere(rank, spec, x, target, dp.pair.mlp.params)
    start, hist_m, hist_t = 0, [], []
    if ck is not None:
        restore_run(dp.pair, ck, spec.device)
        start = int(ck["step"])
        hist_m, hist_t = [ck["losses_manual"]], [ck["losses_twin"]]
    state = {"worst": ck.get("worst_tier", "bitwise") if ck else "bitwise", "checks": 0,
             "interrupted": False, "last_checkpoint": None}
    sched = datasets.batches(x.shape[0], spec.batch_size, spec.steps, spec.seed)[start:]
    if start and sched:
        # a fresh DDP would use its first-iteration bucket again; the unbroken run had rebuilt
        rows = dp.shard(sched[0], x.shape[0]).to(x.device)
        dp.resume_buckets(x[rows], target[rows])
    status, message = "completed", ""
    for step, idx in enumerate(sched, start):
        _faults(job, rank, step)
        rows = dp.shard(idx, x.shape[0]).to(x.device)
        loss_m, loss_t, red, grads_t = dp.step(x[rows], target[rows])
        pair_loss = torch.stack([loss_m, loss_t])
        everyone = [torch.empty_like(pair_loss) for _ in range(world_size)]
        dist.all_gather(everyone, pair_loss)
        mean = torch.stack(everyone).sum(0) / world_size
        hist_m.append(mean[0:1].cpu())
        hist_t.append(mean[1:2].cpu())
        verdicts = [compare_curves("loss", loss_m.reshape(1), loss_t.reshape(1), required=tier)]
        verdicts += [compare_tensors(f"{n}.grad", red[n], grads_t[n], required=tier) for n in red]
        done = step + 1
        if done % check_every == 0 or done == spec.steps:
            twin_final = twin_mod.params_of(dp.pair.twin)
            verdicts += [compare_tensors(n, p, twin_final[n], "curve", required=tier)
                         for n, p in dp.pair.mlp.params.items()]
            flat = torch.cat([_flat(dp.pair.mlp.params), _flat(twin_final)])
            ref = flat.clone()
            dist.broadcast(ref, 0)
            verdicts.append(compare_tensors("params vs rank 0", flat, ref, "curve",
                                            strict_bits=True))
        bad = [f"rank {rank}: {v.message()}" for v in verdicts if not v.passed]
        for v in verdicts:
            state["checks"] += 1
            state["worst"] = max(state["worst"], v.tier, key=TIERS.index)
        flags = [None] * world_size
        dist.all_gather_object(flags, bad)
        bad = [m for f in flags for m in f]
        if bad:
            status, message = "diverged", f"step {step}: {bad[0]}"
            break
        if (done % check_every == 0 or done == spec.steps) and rank == 0 and out_dir:
            _save(out_dir, dp.pair, spec, example, done, hist_m, hist_t, state, world_size)
        if (done % check_every == 0 or done == spec.steps):
            dist.barrier()  # no rank runs ahead of a checkpoint being written
    if rank != 0:
        return None
    losses_m, losses_t = torch.cat(hist_m), torch.cat(hist_t)
    summary = run_summary(spec, example, tier, state, status, message, start, losses_m, losses_t,
                          dp.pair, x, target, time.time() - started)
    summary.update(world_size=world_size, backend=dist.get_backend(),
                   loss_note="losses: the mean over ranks of each rank's loss on its shard")
    if out_dir:
        write_outputs(out_dir, spec, summary, losses_m, losses_t, dp.pair, x, target)
    return summary


def _save(out_dir, pair, spec, example, step, hist_m, hist_t, state, world_size):
    """refnet.checkpoint's run checkpoint plus the world size, written atomically by rank 0."""
    save_run(os.path.join(out_dir, CHECKPOINT_NAME), pair, spec, example, step,
             torch.cat(hist_m), torch.cat(hist_t), state["worst"], world_size=world_size)
    state["last_checkpoint"] = step
