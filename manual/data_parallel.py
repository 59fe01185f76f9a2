"""Data-parallel gradient reduction for the manual MLP, the way DistributedDataParallel does it.

Each rank runs the manual forward/backward on its shard of the mini-batch; `GradReducer.reduce`
then averages the gradients over the ranks with torch.distributed collectives; every rank then
applies the same optimizer step to the same averaged gradients, so the parameters stay identical.

The DDP rules mirrored (torch 2.13, no communication hook, gradient_as_bucket_view=False), each
measured to decide the last bit with gloo (refnet/dp_pair.py, docs/data-parallel.md):
1. Scaling: each gradient is MULTIPLIED by 1/world_size (a Python float, i.e. the double
   1.0/world_size rounded to the gradient's dtype) WHILE it is copied into the flat bucket
   (reducer.cpp mark_variable_ready_dense: at::mul_out(bucket_view, grad, 1/div_factor)); the
   bucket is then all-reduced with SUM.  Not `div_` before the all-reduce (what the
   allreduce_hook comm hook does) and not a division after it: for world size 3 those differ.
2. Bucket layout: gradients are flattened into buckets and each bucket is one all_reduce; the
   position of an element in the bucket decides the order of additions inside gloo's ring
   all-reduce for world size >= 3.  Iteration 1: one bucket, parameters in registration order
   (DDP puts everything in one bucket before it has seen a backward pass).  From iteration 2 on:
   buckets rebuilt in the order gradients became ready in iteration 1 (ready_order: for an MLP
   last layer first, bias before weight; a norm layer's between the linear layers around it),
   a first bucket capped at 1 MiB and the rest at 25 MiB.
3. The reduced bucket is copied back into each gradient (no arithmetic).
"""
import torch
import torch.distributed as dist

FIRST_BUCKET_BYTES = 1024 * 1024          # dist._DEFAULT_FIRST_BUCKET_BYTES
BUCKET_BYTES = 25 * 1024 * 1024           # DDP's bucket_cap_mb=25


def ready_order(names, autocast=False):
    """The order DDP's autograd hooks see an MLP's gradients become ready in its first backward
    (the order its buckets are rebuilt in).  Measured with post-accumulate-grad hooks on the
    twin (verify/test_data_parallel.py, test_ready_order_is_autograds) and mirrored here by the net's structure:
      - the last layer first, each layer's bias before its weight (``layers.{L-1}.bias``,
        ``layers.{L-1}.weight``, …); under autocast the weight before the bias (the weight's
        cast has the later autograd sequence number, so the engine runs its backward first);
      - a norm layer's weight then bias right after the next linear layer's gradients, before
        its own linear layer's (``layers.1.*``, ``norms.0.weight``, ``norms.0.bias``,
        ``layers.0.*``): not at the end, where reverse registration order would put them;
      - ``embed.weight`` (used first) last.
    names: the parameter names; a name of another kind is refused (no measured order)."""
    names = list(names)
    n_layers = sum(1 for n in names if n.startswith("layers.") and n.endswith(".weight"))
    order = []
    for i in reversed(range(n_layers)):
        own = [f"layers.{i}.bias", f"layers.{i}.weight"]
        order += [n for n in (own[::-1] if autocast else own) if n in names]
        order += [n for n in (f"norms.{i - 1}.weight", f"norms.{i - 1}.bias") if n in names]
    order += [n for n in ("embed.weight",) if n in names]
    unknown = [n for n in names if n not in order]
    if unknown:
        raise ValueError(f"names: no gradient-ready order known for {unknown}; expected "
                         f"layers.*, norms.* and embed.weight")
    return order


def assign_buckets(names, nbytes, limits):
    """Split names (in order) into buckets as reducer.cpp compute_bucket_assignment_by_size does:
    fill a bucket until its size reaches the current limit, then start the next one with the next
    limit (the last limit repeats).  nbytes: name -> size in bytes."""
    buckets, current, size, limit_index = [], [], 0, 0
    for name in names:
        current.append(name)
        size += nbytes[name]
        if size >= limits[limit_index]:
            buckets.append(current)
            current, size = [], 0
            limit_index = min(limit_index + 1, len(limits) - 1)
    if current:
        buckets.append(current)
    return buckets


class GradReducer:
    """Average gradient dicts over the ranks of a process group, bucket by bucket, as DDP does.

    params: the name -> tensor dict of the model.
    group: a torch.distributed process group (None: the default group).
    registration: the names in DDP's ``module.parameters()`` order, its first bucket (default:
        the dict order of params).
    autocast: the gradients come from an autocast backward (ready_order).
    """

    def __init__(self, params, group=None, registration=None, autocast=False):
        self.names = list(params)
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.nbytes = {n: p.numel() * p.element_size() for n, p in params.items()}
        registration = self.names if registration is None else list(registration)
        if sorted(registration) != sorted(self.names):
            raise ValueError(f"registration: expected the names {sorted(self.names)}, got "
                             f"{sorted(registration)}")
        self.buckets = [registration]              # iteration 1: one bucket, registration order
        self.autocast = autocast
        self.rebuilt = False

    def rebuild(self):
        """After the first iteration: buckets in gradient-ready order (DDP's _rebuild_buckets)."""
        self.buckets = assign_buckets(ready_order(self.names, self.autocast), self.nbytes,
                                      [FIRST_BUCKET_BYTES, BUCKET_BYTES])
        self.rebuilt = True

    def reduce(self, grads):
        """grads: name -> local gradient.  Returns name -> gradient averaged over the ranks."""
        # Batch norm (helper "norm"): running statistics are buffers, not gradients; DDP
        # broadcasts buffers from rank 0 before each forward, which the caller must then mirror.
        scale = 1.0 / self.world_size
        out = {}
        for bucket in self.buckets:
            g0 = grads[bucket[0]]
            flat = torch.empty(sum(grads[n].numel() for n in bucket), dtype=g0.dtype,
                               device=g0.device)
            offset = 0
            for name in bucket:  # rule 1: multiply by 1/world_size while copying into the bucket
                n = grads[name].numel()
                torch.mul(grads[name].reshape(-1), scale, out=flat[offset:offset + n])
                offset += n
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)  # rule 2: one per bucket
            offset = 0
            for name in bucket:  # rule 3: copy back
                n = grads[name].numel()
                out[name] = flat[offset:offset + n].view_as(grads[name]).clone()
                offset += n
        if not self.rebuilt:
            self.rebuild()
        return {name: out[name] for name in self.names}
