"""Data-parallel runs: the manual MLP reduced by manual/data_parallel.py beside the twin wrapped in
nn.parallel.DistributedDataParallel, on N processes (gloo on CPU, NCCL on CUDA).

Launching N ranks (or joining torchrun's) is refnet/dp_launch.py; training is refnet/dp_train.py.
Every collective has the process group's timeout (TIMEOUT_S): a rank that dies or hangs makes
the others fail within it instead of hanging.

Each step takes the global mini-batch of single-process training (refnet.data.batches, same seed)
and gives rank r the r-th of N contiguous pieces (torch.tensor_split).  Both sides then run on the
shard; the manual side averages its gradients with GradReducer, the twin with DDP; both apply the
same optimizer step on every rank.
"""
import hashlib
import os
import signal

import torch
import torch.distributed as dist

from manual.data_parallel import GradReducer
from refnet import data as datasets
from refnet import examples, harness
from refnet import twin as twin_mod
from refnet.compare import Check, compare_curves, compare_tensors
from refnet.spec import Spec

TIMEOUT_S = 30          # every collective (and the rendezvous) fails after this many seconds
SUM_LOSSES = ("sum_squared",)


class RankFailed(RuntimeError):
    """One rank failed; the message is one line naming the rank."""


def backend_for(device):
    return "nccl" if device == "cuda" else "gloo"


# -- one data-parallel pair (manual + DDP twin) on one rank --

class DPPair:
    def __init__(self, spec, rank, world_size, params=None):
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.pair = harness.build_pair(spec, params)
        ids = [torch.cuda.current_device()] if spec.device == "cuda" else None
        # DDP's defaults: no comm hook, bucket_cap_mb 25, gradient_as_bucket_view False.
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.pair.twin, device_ids=ids)
        self.reducer = GradReducer(self.pair.mlp.params)

    def shard(self, idx, n):
        """Rank r's rows of a global batch (idx None: all n rows)."""
        idx = torch.arange(n) if idx is None else idx
        if idx.numel() < self.world_size:
            raise ValueError(f"batch_size: a batch of {idx.numel()} rows cannot be split over "
                             f"{self.world_size} processes; give a batch of at least that many")
        if self.spec.norm == "batchnorm" and idx.numel() < 2 * self.world_size:
            raise ValueError(f"batch_size: batch norm normalizes each rank's shard, which needs at "
                             f"least 2 rows; a batch of {idx.numel()} rows over {self.world_size} "
                             f"processes leaves fewer")
        return torch.tensor_split(idx, self.world_size)[self.rank]

    def sync_buffers(self):
        """DDP's broadcast_buffers (its default): before every training forward, rank 0's
        buffers (batch norm's running statistics) overwrite every rank's.  The manual side does
        the same; each rank then normalizes with its own shard's statistics (no SyncBatchNorm)
        and updates the running statistics from them."""
        for b in self.pair.mlp.buffers.values():
            dist.broadcast(b, src=0)

    def resume_buckets(self, xb, tb):
        """After a restart, put both sides in the bucket layout of the unbroken run: one
        discarded DDP forward/backward (no optimizer step) lets DDP record the gradient-ready
        order and rebuild its buckets at the next forward; the manual reducer rebuilds directly."""
        twin = self.pair.twin   # the discarded forward must not move running stats or dropout
        buffers, rng = twin_mod.buffers_of(twin), getattr(twin, "_rng_state", None)
        self.pair.twin_opt.zero_grad(set_to_none=True)
        self.pair.twin_loss(self.ddp(xb), tb).backward()
        self.pair.twin_opt.zero_grad(set_to_none=True)
        twin_mod.load_buffers(twin, buffers)
        if rng is not None:
            twin._rng_state = rng
        self.reducer.rebuild()

    def step(self, xb, tb):
        """One step on both sides; returns (loss_m, loss_t, reduced manual grads, DDP grads)."""
        mlp = self.pair.mlp
        self.sync_buffers()
        loss_m, cache = mlp.forward(xb, tb)
        grads, _ = mlp.backward(cache)
        reduced = self.reducer.reduce(grads)
        mlp.step(reduced)
        self.pair.twin_opt.zero_grad(set_to_none=True)
        loss_t = self.pair.twin_loss(self.ddp(xb), tb)
        loss_t.backward()
        grads_t = {n: g.detach().clone() for n, g in twin_mod.grads_of(self.pair.twin).items()}
        self.pair.twin_opt.step()
        return loss_m.detach(), loss_t.detach(), reduced, grads_t


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params.values()])


def _digest(*tensors_or_text):
    h = hashlib.sha256()
    for item in tensors_or_text:
        if isinstance(item, torch.Tensor):
            h.update(item.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(item).encode())
    return h.hexdigest()[:16]


def check_same_everywhere(rank, spec, x, target, params):
    """At start-up: spec, data and initial parameters must be the same on every rank."""
    mine = {"spec": _digest(sorted(spec.to_dict().items())), "data": _digest(x, target),
            "params": _digest(*params.values())}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for r, theirs in enumerate(everyone):
        for what in ("spec", "data", "params"):
            if theirs[what] != everyone[0][what]:
                raise ValueError(f"rank {r} has a different {what} than rank 0 "
                                 f"({theirs[what]} vs {everyone[0][what]}); every process must "
                                 f"run the same {what}")


def _faults(job, rank, step):
    """Test hooks: job["raise_at"] / job["kill_at"] = [rank, step] make that rank fail there."""
    if job.get("raise_at") == [rank, step]:
        raise RuntimeError(f"injected failure at step {step}")
    if job.get("kill_at") == [rank, step]:
        os.kill(os.getpid(), signal.SIGKILL)


def _data(spec, example, rank, job):
    x, target = (examples.get(example).training_data(spec) if example is not None
                 else datasets.load_data(spec))
    if job.get("perturb_data") == rank:  # test hook: this rank's data differs
        x = x.clone()
        x.view(-1)[0] += 1
    return x, target


# -- verify: manual DP vs DDP, every rank, bitwise; manual DP vs one process, graded --

def verify_spec(spec, rank, world_size, job=None):
    """Train spec.steps steps data-parallel; returns rank 0's list of Checks (others: None)."""
    job = job or {}
    x, target = _data(spec, None, rank, job)
    dp = DPPair(spec, rank, world_size)
    check_same_everywhere(rank, spec, x, target, dp.pair.mlp.params)
    sched = datasets.batches(x.shape[0], spec.batch_size, spec.steps, spec.seed)
    lm, lt, gm, gt = [], [], {n: [] for n in dp.pair.mlp.params}, {n: [] for n in dp.pair.mlp.params}
    for step, idx in enumerate(sched):
        _faults(job, rank, step)
        rows = dp.shard(idx, x.shape[0]).to(x.device)
        loss_m, loss_t, red, grads_t = dp.step(x[rows], target[rows])
        lm.append(loss_m)
        lt.append(loss_t)
        for n in red:
            gm[n].append(red[n])
            gt[n].append(grads_t[n])
    strict = dict(strict_bits=True)
    tag = f"dp{world_size}"
    grads = [compare_tensors(f"rank{rank}.{n}.grad[steps]", torch.stack(gm[n]), torch.stack(gt[n]),
                             "grad", **strict) for n in gm]
    curve = [compare_curves(f"rank{rank}.loss_curve", torch.stack(lm), torch.stack(lt), **strict)]
    twin_final = twin_mod.params_of(dp.pair.twin)
    final = [compare_tensors(f"rank{rank}.final.{n}", p, twin_final[n], "curve", **strict)
             for n, p in dp.pair.mlp.params.items()]
    twin_buffers = twin_mod.buffers_of(dp.pair.twin)   # batch norm's running statistics
    final += [compare_tensors(f"rank{rank}.final.{n}", b, twin_buffers[n], "curve", **strict)
              for n, b in dp.pair.mlp.buffers.items()]
    flat = torch.cat([_flat(dp.pair.mlp.params), _flat(twin_final)])  # both sides' parameters
    everyone = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(everyone, flat)
    ranks = [compare_tensors(f"rank{r}.params vs rank0", everyone[r], everyone[0], "curve", **strict)
             for r in range(1, world_size)]
    # the global loss of a step: the mean over ranks of the rank losses (what DDP users log)
    losses = torch.stack([torch.stack(lm), torch.stack(lt)])
    all_losses = [torch.empty_like(losses) for _ in range(world_size)]
    dist.all_gather(all_losses, losses)
    mine = {"grads": grads, "curve": curve, "final": final}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, mine)
    if rank != 0:
        return None
    checks = [Check(f"{tag}.reduced_grads", [v for g in gathered for v in g["grads"]],
                    oracle="manual DP vs DDP"),
              Check(f"{tag}.loss_curve[{spec.steps}]", [v for g in gathered for v in g["curve"]],
                    oracle="manual DP vs DDP"),
              Check(f"{tag}.final_params", [v for g in gathered for v in g["final"]],
                    oracle="manual DP vs DDP"),
              Check(f"{tag}.ranks_identical", ranks, oracle="rank r vs rank 0")]
    checks.extend(_vs_single(spec, x, target, world_size, torch.stack(all_losses), gm))
    return checks


def _vs_single(spec, x, target, world_size, all_losses, gm):
    """Manual DP vs the manual MLP on the whole batch in one process: graded, never bitwise
    by construction (the batch mean is split into per-rank means; the sums are ordered
    differently)."""
    note = (f"graded: the mean over {world_size} ranks of per-rank means is the batch mean only in "
            f"exact arithmetic, and the additions happen in another order")
    if spec.norm == "batchnorm" or spec.dropout:
        return []  # per-shard batch statistics / per-shard masks: another function of the batch
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


# Specs `refnet verify --nproc N` checks without --spec (small enough for CI): the document's
# net (smaller), a deep ReLU net with biases, a cross-entropy + Adam net.  Batch norm: helper
# "norm" adds it; per-rank batch statistics (DDP without SyncBatchNorm) need only DPPair.step
# (DPPair.sync_buffers mirrors DDP's broadcast of rank 0's buffers; bn_dp_spec is the check).
def dp_specs(dtype="float64", device="cpu", steps=6):
    return [
        Spec(sizes=[64, 100, 10], activation="sigmoid", bias=False, loss="sum_squared",
             init="randn", data="random", n_samples=24, optimizer={"name": "sgd", "lr": 1e-4},
             steps=steps, dtype=dtype, device=device, name="dp_document_net"),
        Spec(sizes=[8, 32, 32, 32, 4], activation="relu", loss="mse", data="random", n_samples=48,
             batch_size=24, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}, steps=steps,
             dtype=dtype, device=device, name="dp_deep_relu"),
        Spec(sizes=[2, 32, 3], activation="tanh", loss="cross_entropy", data="spiral",
             n_samples=60, batch_size=12, optimizer={"name": "adam", "lr": 0.01}, steps=steps,
             dtype=dtype, device=device, name="dp_ce_adam"),
    ]


def bn_dp_spec(dtype="float64", device="cpu", steps=6):
    """Batch norm (per-rank statistics, rank 0's running statistics broadcast each step) and,
    on the CPU, dropout (each rank's own stream), data-parallel."""
    return Spec(sizes=[2, 16, 16, 3], activation="relu", loss="cross_entropy", data="spiral",
                n_samples=48, batch_size=24, norm="batchnorm", dropout=0.2 if device == "cpu" else 0.0,
                optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, steps=steps, dtype=dtype,
                device=device, name="dp_batchnorm_dropout")
