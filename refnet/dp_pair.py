"""The data-parallel runtime on one rank: the manual MLP reduced by manual/data_parallel.py beside
the twin wrapped in nn.parallel.DistributedDataParallel (gloo on CPU, NCCL on CUDA).

`DPPair` is the data-parallel hook of the one training loop (refnet.train.run_loop and the step
refnet.harness.lockstep_step): it shards each global batch, mirrors DDP's buffer broadcast and
gradient averaging on the manual side, and holds the collectives the loop needs (the mean loss
over ranks, "every rank agrees", "parameters identical on every rank", every rank's dropout
stream for the checkpoint).  Launching ranks: refnet/dp_launch.py; the verify checks:
refnet/dp_verify.py; the built-in specs: refnet/dp_specs.py.

Every collective has the process group's timeout (TIMEOUT_S): a rank that dies or hangs makes
the others fail within it instead of hanging.

Each step takes the global mini-batch of single-process training (refnet.data.batches, same seed)
and gives rank r the r-th of N contiguous pieces (torch.tensor_split).
"""
import contextlib
import hashlib

import torch
import torch.distributed as dist

from manual.data_parallel import GradReducer
from refnet import data as datasets
from refnet import examples, harness
from refnet import twin as twin_mod
from refnet.compare import compare_tensors

TIMEOUT_S = 30          # every collective (and the rendezvous) fails after this many seconds

# The training-step keys --nproc carries (docs/data-parallel.md, "The training step's keys");
# the others (blocks) are refused by name in one line (check_nproc_keys).
DP_STEP_KEYS = ("clip_grad_norm", "accumulate", "lr_schedule", "autocast")


def check_nproc_keys(spec):
    """A one-line ValueError naming a training-step key --nproc does not carry (blocks)."""
    spec.refuse_step_keys("--nproc", carried=DP_STEP_KEYS)


class RankFailed(RuntimeError):
    """One rank failed; the message is one line naming the rank."""


def backend_for(device):
    return "nccl" if device == "cuda" else "gloo"


def test_hook(job, event, rank, value=None):
    """The one test hook of a data-parallel job: job["test_hook"], a picklable callable
    hook(event, rank, value) -> value, called on every rank.  Events: "data" (value: this rank's
    (x, target); the hook returns them, possibly changed) and "step" (value: the step just
    trained; the return value is ignored).  The tests inject their faults through it (kill or
    raise in one rank, different data on one rank: verify/_dp_faults.py); a job built by the CLI
    has none, and then this returns value unchanged."""
    hook = job.get("test_hook")
    return value if hook is None else hook(event, rank, value)


class DPPair:
    """One rank's pair: harness.Pair with its twin wrapped in DDP and a GradReducer for the
    manual side; the data-parallel hook of refnet.harness.lockstep_step and refnet.train."""

    def __init__(self, spec, rank, world_size, params=None):
        self.spec, self.rank, self.world_size = spec, rank, world_size
        check_nproc_keys(spec)
        self.pair = harness.build_pair(spec, params)
        ids = [torch.cuda.current_device()] if spec.device == "cuda" else None
        # DDP's defaults: no comm hook, bucket_cap_mb 25, gradient_as_bucket_view False.
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.pair.twin, device_ids=ids)
        # DDP's first bucket is the twin's parameters() order (embed.weight first; the manual
        # dict keeps it last)
        self.reducer = GradReducer(self.pair.mlp.params,
                                   registration=[n for n, _ in self.pair.twin.named_parameters()],
                                   autocast=spec.autocast is not None)

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

    def step(self, xb, tb):
        """One step on both sides of this rank's shard (refnet.harness.lockstep_step), keeping
        the gradients each side applied (manual: reduced; DDP: after its all-reduce)."""
        return harness.lockstep_step(self.pair, xb, tb, dp=self, keep_grads=True)

    def resume_buckets(self, x, target, start):
        """After a restart at step `start`, put both sides in the bucket layout of the unbroken
        run: one discarded DDP forward/backward on the next batch (no optimizer step) lets DDP
        record the gradient-ready order and rebuild its buckets at the next forward; the manual
        reducer rebuilds directly.  The discarded forward moves no running statistics and no
        dropout stream."""
        idx = datasets.batches(x.shape[0], self.spec.batch_size, start + 1, self.spec.seed)[start]
        rows = self.shard(idx, x.shape[0]).to(x.device)
        twin = self.pair.twin
        buffers, rng = twin_mod.buffers_of(twin), getattr(twin, "_rng_state", None)
        self.pair.twin_opt.zero_grad(set_to_none=True)
        # under autocast the ready order is autocast's (manual.data_parallel.ready_order)
        with (torch.autocast(x.device.type, dtype=self.spec.autocast_dtype) if self.spec.autocast
              else contextlib.nullcontext()):
            loss = self.pair.twin_loss(self.ddp(x[rows]), target[rows])
        loss.backward()
        self.pair.twin_opt.zero_grad(set_to_none=True)
        twin_mod.load_buffers(twin, buffers)
        if rng is not None:
            twin._rng_state = rng
        self.reducer.rebuild()

    # -- the collectives of the training loop --

    def mean_loss(self, loss_m, loss_t):
        """The step's loss of each side: the mean over ranks of the rank losses (what DDP users
        log, and what losses.csv holds)."""
        pair_loss = torch.stack([loss_m, loss_t])
        everyone = [torch.empty_like(pair_loss) for _ in range(self.world_size)]
        dist.all_gather(everyone, pair_loss)
        mean = torch.stack(everyone).sum(0) / self.world_size
        return mean[0], mean[1]

    def same_params_verdict(self):
        """Both sides' parameters on this rank vs rank 0's, bitwise (a Verdict)."""
        flat = torch.cat([flat_params(self.pair.mlp.params),
                          flat_params(twin_mod.params_of(self.pair.twin))])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        return compare_tensors("params vs rank 0", flat, ref, "curve", tier="bitwise")

    def agree(self, failures):
        """Every rank's failure messages (each prefixed with its rank), the same list on every
        rank, so that all ranks stop at the same step."""
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, [f"rank {self.rank}: {m}" for m in failures])
        return [m for theirs in everyone for m in theirs]

    def gather_streams(self):
        """Every rank's dropout streams {"manual_rng", "twin_rng"}, in rank order: ranks with
        unequal shards draw different numbers of masks, so a checkpoint keeps each rank's."""
        mine = {"manual_rng": self.pair.mlp.generator.get_state(),
                "twin_rng": getattr(self.pair.twin, "_rng_state", None)}
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        return everyone

    def barrier(self):
        dist.barrier()

    def summary_fields(self):
        """What summary.json adds for a data-parallel run."""
        return {"world_size": self.world_size, "backend": dist.get_backend(),
                "loss_note": "losses: the mean over ranks of each rank's loss on its shard"}


def flat_params(params):
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


def rank_data(spec, example, rank, job):
    """This rank's (x, target): the example's or the spec's data set (then the job's test hook)."""
    x, target = (examples.get(example).training_data(spec) if example is not None
                 else datasets.load_data(spec))
    return test_hook(job, "data", rank, (x, target))
