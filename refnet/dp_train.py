"""`refnet train --nproc N`: the lockstep training run of refnet.train, data-parallel.

Each rank runs refnet.train.run_loop, the loop of one-process training, with its
refnet.dp_pair.DPPair as the data-parallel hook: every rank trains both sides on its shard of
each global mini-batch; rank 0 alone writes losses.csv (a column per side: the mean over ranks of
the rank losses), summary.json, the plots and the checkpoints, all atomically.  The checkpoint
records the world size and every rank's dropout streams; resuming with another N is refused.
The parameters are identical on every rank (checked at every check point), so rank 0's are the
run's.
"""
from refnet import examples
from refnet.checkpoint import check_resume, load_checkpoint
from refnet.dp_pair import DPPair, check_same_everywhere, rank_data, test_hook
from refnet.spec import Spec
from refnet.train import RunConfig, default_tier, run_loop


def train_worker(rank, world_size, job):
    """Train job["spec"] (a dict) on this rank; returns rank 0's summary (others: None)."""
    spec, example = Spec.from_dict(job["spec"]), job.get("example")
    ck = load_checkpoint(job["resume"]) if job.get("resume") else None
    if ck is not None:
        check_resume(ck, spec, world_size)
    x, target = rank_data(spec, example, rank, job)
    params = examples.get(example).initial_params(spec) if example is not None else None
    dp = DPPair(spec, rank, world_size, params)
    check_same_everywhere(rank, spec, x, target, dp.pair.mlp.params)
    cfg = RunConfig(spec, job.get("tier") or default_tier(spec), job.get("check_every", 50),
                    job.get("out"), example,
                    on_step=lambda step, *_: test_hook(job, "step", rank, step))
    return run_loop(cfg, dp.pair, x, target, ck, dp)
