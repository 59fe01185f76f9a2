"""Data-parallel bench: step time and per-rank peak memory vs N, manual DP step vs DDP step.

`bench_dp(nprocs)` returns JSON rows, one per N: the median step time of each side on rank 0
(forward, backward, gradient reduction, optimizer step), their ratio manual/DDP, and per-rank
peak memory.  CPU: one torch thread per rank; peak memory is the process's peak RSS (both sides
live in one process, so no per-side split).  CUDA: torch.cuda.max_memory_allocated per side.
"""
import resource
import time

import torch
import torch.distributed as dist

from refnet import data as datasets
from refnet.dp_pair import DPPair
from refnet.spec import Spec

BENCH_SPEC = dict(sizes=[256, 512, 512, 10], activation="relu", loss="cross_entropy",
                  data="random", n_samples=512, optimizer={"name": "sgd", "lr": 0.01},
                  name="dp_bench")


def _time_steps(fn, steps, cuda):
    times = []
    for _ in range(steps):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_worker(rank, world_size, job):
    spec = Spec.from_dict({**BENCH_SPEC, "device": job["device"], "dtype": job["dtype"]})
    cuda = spec.device == "cuda"
    dp = DPPair(spec, rank, world_size)
    x, target = datasets.random(n=spec.n_samples, d_in=spec.sizes[0], d_out=spec.sizes[-1],
                                seed=spec.seed, dtype=spec.torch_dtype, device=spec.device)
    target = target.argmax(1) if target.dim() == 2 else target
    rows = dp.shard(None, x.shape[0]).to(x.device)
    xb, tb = x[rows], target[rows]
    mlp, pair = dp.pair.mlp, dp.pair

    def manual_step():
        loss, cache = mlp.forward(xb, tb)
        grads, _ = mlp.backward(cache)
        mlp.step(dp.reducer.reduce(grads))

    def ddp_step():
        pair.twin_opt.zero_grad(set_to_none=True)
        pair.twin_loss(dp.ddp(xb), tb).backward()
        pair.twin_opt.step()

    out = {}
    for side, fn in (("manual", manual_step), ("ddp", ddp_step)):
        fn()  # warm-up (and DDP's bucket rebuild)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out[f"{side}_step_ms"] = 1e3 * _time_steps(fn, job["steps"], cuda)
        if cuda:
            out[f"{side}_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gathered = [None] * world_size
    dist.all_gather_object(gathered, out)
    return gathered if rank == 0 else None


def bench_dp(nprocs, run_job, device="cpu", dtype="float32", steps=20):
    """One JSON row per N in nprocs.  run_job(job, n): refnet.dp_launch.run_job."""
    rows = []
    for n in nprocs:
        ranks = run_job({"mode": "bench", "device": device, "dtype": dtype, "steps": steps}, n)
        if ranks is None:
            return None
        r0 = ranks[0]
        row = {"nproc": n, "device": device, "dtype": dtype, "spec": BENCH_SPEC["sizes"],
               "manual_step_ms": round(r0["manual_step_ms"], 3),
               "ddp_step_ms": round(r0["ddp_step_ms"], 3),
               "step_time_ratio_manual_over_ddp": round(r0["manual_step_ms"] / r0["ddp_step_ms"], 3),
               "peak_rss_mb_per_rank": [round(r["peak_rss_mb"], 1) for r in ranks]}
        if "manual_peak_mb" in r0:
            row["peak_mb_ratio_manual_over_ddp"] = round(r0["manual_peak_mb"] / r0["ddp_peak_mb"], 3)
        rows.append(row)
    return rows

