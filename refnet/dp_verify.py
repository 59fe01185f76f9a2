"""`refnet verify --nproc N`: manual DP vs DDP on every rank, bitwise; manual DP vs one process,
graded (docs/data-parallel.md).  Runs on every rank inside the process group (refnet.dp_launch).
"""
import torch
import torch.distributed as dist

from refnet import data as datasets
from refnet import harness
from refnet import twin as twin_mod
from refnet.compare import Check, compare_curves, compare_tensors
from refnet.dp_pair import DPPair, check_same_everywhere, flat_params, rank_data, test_hook

SUM_LOSSES = ("sum_squared",)


def verify_spec(spec, rank, world_size, job=None):
    """Train spec.steps steps data-parallel; returns rank 0's list of Checks (others: None)."""
    job = job or {}
    x, target = rank_data(spec, None, rank, job)
    dp = DPPair(spec, rank, world_size)
    check_same_everywhere(rank, spec, x, target, dp.pair.mlp.params)
    steps = [dp.step(xb, tb) for xb, tb in _shards(dp, x, target, job)]
    mine = _rank_verdicts(dp, steps)
    ranks = _ranks_identical(dp)
    # the global loss of a step: the mean over ranks of the rank losses (what DDP users log)
    losses = torch.stack([torch.stack([s.loss_m for s in steps]),
                          torch.stack([s.loss_t for s in steps])])
    all_losses = [torch.empty_like(losses) for _ in range(world_size)]
    dist.all_gather(all_losses, losses)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, mine)
    if rank != 0:
        return None
    tag, oracle = f"dp{world_size}", "manual DP vs DDP"
    every = {kind: [v for g in gathered for v in g[kind]] for kind in ("grads", "curve", "final")}
    checks = [Check(f"{tag}.reduced_grads", every["grads"], oracle=oracle),
              Check(f"{tag}.loss_curve[{spec.steps}]", every["curve"], oracle=oracle),
              Check(f"{tag}.final_params", every["final"], oracle=oracle),
              Check(f"{tag}.ranks_identical", ranks, oracle="rank r vs rank 0")]
    grads_m = {n: [s.grads_m[n] for s in steps] for n in dp.pair.mlp.params}
    checks.extend(_vs_single(spec, x, target, world_size, torch.stack(all_losses), grads_m))
    return checks


def _shards(dp, x, target, job):
    """This rank's (x_batch, target_batch) of every step; the job's test hook after each."""
    spec = dp.spec
    for step, xb, tb in harness.lockstep_batches(dp.pair, x, target, spec.steps, spec.batch_size,
                                                 spec.seed, shard=dp.shard):
        yield xb, tb
        test_hook(job, "step", dp.rank, step)


def _rank_verdicts(dp, steps):
    """This rank's manual vs DDP verdicts, bitwise: reduced gradients of every step, the loss
    curve, final parameters and running statistics."""
    strict, rank, pair = dict(tier="bitwise"), dp.rank, dp.pair
    grads = [compare_tensors(f"rank{rank}.{n}.grad[steps]",
                             torch.stack([s.grads_m[n] for s in steps]),
                             torch.stack([s.grads_t[n] for s in steps]), "grad", **strict)
             for n in pair.mlp.params]
    curve = [compare_curves(f"rank{rank}.loss_curve", torch.stack([s.loss_m for s in steps]),
                            torch.stack([s.loss_t for s in steps]), **strict)]
    for v in harness.step_curves(steps, strict_bits=True):  # lr, clip norm, loss scale, skips
        v.name = f"rank{rank}.{v.name}"
        curve.append(v)
    twin_final = twin_mod.params_of(pair.twin)
    final = [compare_tensors(f"rank{rank}.final.{n}", p, twin_final[n], "curve", **strict)
             for n, p in pair.mlp.params.items()]
    twin_buffers = twin_mod.buffers_of(pair.twin)   # batch norm's running statistics
    final += [compare_tensors(f"rank{rank}.final.{n}", b, twin_buffers[n], "curve", **strict)
              for n, b in pair.mlp.buffers.items()]
    return {"grads": grads, "curve": curve, "final": final}


def _ranks_identical(dp):
    """Rank r's parameters (both sides) vs rank 0's, for r = 1 … N-1 (on every rank)."""
    flat = torch.cat([flat_params(dp.pair.mlp.params),
                      flat_params(twin_mod.params_of(dp.pair.twin))])
    everyone = [torch.empty_like(flat) for _ in range(dp.world_size)]
    dist.all_gather(everyone, flat)
    return [compare_tensors(f"rank{r}.params vs rank0", everyone[r], everyone[0], "curve",
                            tier="bitwise") for r in range(1, dp.world_size)]


def _vs_single(spec, x, target, world_size, all_losses, gm):
    """Manual DP vs the manual MLP on the whole batch in one process: graded, never bitwise
    by construction (the batch mean is split into per-rank means; the sums are ordered
    differently)."""
    note = (f"graded: the mean over {world_size} ranks of per-rank means is the batch mean only in "
            f"exact arithmetic, and the additions happen in another order")
    if spec.norm == "batchnorm" or spec.dropout:
        return []  # per-shard batch statistics / per-shard masks: another function of the batch
    if spec.autocast is not None or spec.accumulate > 1:
        return []  # the step-0 gradient below is one float32 backward on one batch
    single = harness.build_pair(spec)
    idx0 = datasets.batches(x.shape[0], spec.batch_size, 1, spec.seed)[0]
    xb, tb = (x, target) if idx0 is None else (x[idx0], target[idx0])
    _, cache = single.mlp.forward(xb, tb)
    g1, _ = single.mlp.backward(cache)
    if spec.loss in SUM_LOSSES:
        if spec.reg:
            return []  # (Σ shard losses + N·reg·ΣW²)/N has no single-process counterpart to compare
        # DDP averages sums: the DP gradient is the full-batch gradient divided by N
        g1 = {n: g / world_size for n, g in g1.items()}
        note += f"; a sum loss: the DP gradient is the full-batch one / {world_size}"
    sched = datasets.batches(x.shape[0], spec.batch_size, spec.steps, spec.seed)
    if any((x.shape[0] if idx is None else idx.numel()) % world_size for idx in sched):
        return []  # unequal shards: the mean of per-rank means is not the batch mean at all
    verdicts = [compare_tensors(f"{n}.grad@step0", gm[n][0], g1[n], "grad") for n in g1]
    checks = [Check(f"dp{world_size}_vs_single.grad@step0", verdicts, oracle="manual DP vs 1 process",
                    note=note)]
    if spec.loss not in SUM_LOSSES:  # equal shards: the mean of the means is the batch mean
        losses_1, _ = harness.train_lockstep(harness.build_pair(spec), x, target, spec.steps,
                                             spec.batch_size, spec.seed)
        dp_curve = all_losses[:, 0].sum(0) / world_size
        checks.append(Check(f"dp{world_size}_vs_single.loss_curve[{spec.steps}]",
                            [compare_curves("loss_curve", dp_curve, losses_1)],
                            oracle="manual DP vs 1 process", note=note))
    return checks
