"""Everything of the training step at once, over a whole loss curve, bit for bit: an input
projection, two residual FFN blocks (pre-LayerNorm) and a head, trained on spiral with AdamW,
warm-up + cosine, clipping that is active in the early steps, and 2 micro-batches per step — the
manual pieces composed by hand against a plain nn.Module trained by the stock PyTorch loop.

(The wiring into manual.MLP / the twin / the training loop is the loop's; this test shows the
pieces compose bitwise and what the wiring must keep: the twin's parameter order for the norm.)"""
import warnings

import pytest
import torch
from torch import nn

import manual
from manual import blocks, schedules, step
from manual.layers import linear_backward, linear_forward
from manual.mlp import init_params
from refnet import data
from refnet import twin as twin_mod

D_IN, WIDTH, HIDDEN, CLASSES, N_BLOCKS = 2, 12, 20, 3, 2
CLIP = {"max_norm": 0.6, "norm_type": 2}
SCHEDULE = {"name": "warmup_cosine", "warmup_steps": 4, "min_lr": 1e-4}
STEPS, K, ROWS = 24, 2, 10


class ManualStack:
    """layers.0 (input projection) -> blocks -> layers.1 (head) -> loss, from manual's pairs."""

    def __init__(self, params, optimizer):
        self.params, self.optimizer = params, optimizer

    def forward(self, x, target):
        p = self.params
        h, proj_cache = linear_forward(x, p["layers.0.weight"], p["layers.0.bias"])
        h, block_caches = blocks.blocks_forward(h, p, N_BLOCKS, "tanh", "layer")
        out, head_cache = linear_forward(h, p["layers.1.weight"], p["layers.1.bias"])
        loss, loss_cache = manual.loss_forward("cross_entropy", out, target)
        return loss, (proj_cache, block_caches, head_cache, loss_cache)

    def backward(self, cache, dloss):
        proj_cache, block_caches, head_cache, loss_cache = cache
        grads = {}
        dout = manual.loss_backward("cross_entropy", dloss, loss_cache)
        dh, grads["layers.1.weight"], grads["layers.1.bias"] = linear_backward(dout, head_cache)
        dh, block_grads = blocks.blocks_backward(dh, block_caches)
        grads.update(block_grads)
        dx, grads["layers.0.weight"], grads["layers.0.bias"] = linear_backward(dh, proj_cache)
        return {name: grads[name] for name in self.params}, dx

    def step(self, grads):
        self.optimizer.step(self.params, grads)


class TwinStack(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(D_IN, WIDTH, dtype=dtype),
                                     nn.Linear(WIDTH, CLASSES, dtype=dtype)])
        self.blocks = twin_mod.ffn_blocks(N_BLOCKS, WIDTH, HIDDEN, "tanh", "layer", dtype=dtype)

    def forward(self, x):
        h = self.layers[0](x)
        for block in self.blocks:
            h = block(h)
        return self.layers[1](h)


def _params(dtype):
    """Blocks first, then the layers: not the twin's order, so the clip's `order` matters."""
    params = blocks.init_block_params(N_BLOCKS, WIDTH, HIDDEN, "layer",
                                      generator=torch.Generator().manual_seed(3), dtype=dtype)
    params.update(init_params([D_IN, WIDTH, CLASSES], "tanh", seed=2, dtype=dtype))
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ffn_stack_curve_bitwise(dtype):
    params = _params(dtype)
    twin = TwinStack(dtype)
    twin_mod._copy_into(dict(twin.named_parameters()), params, "params")
    order = [name for name, _ in twin.named_parameters()]   # layers.*, then blocks.*
    model = ManualStack({n: params[n].clone() for n in params},
                        manual.make_optimizer("adamw", lr=0.02))
    twin_opt = twin_mod.make_optimizer(twin, "adamw", lr=0.02)
    sched_m = schedules.make_schedule(SCHEDULE, 0.02, STEPS)
    sched_t = twin_mod.make_scheduler(twin_opt, SCHEDULE, STEPS)
    x, labels = data.spiral(n_per_class=20, seed=1, dtype=dtype)
    picks = data.batches(x.shape[0], ROWS, STEPS * K, seed=4)
    clipped = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for s in range(STEPS):
            batches = [(x[i], labels[i]) for i in picks[s * K:(s + 1) * K]]
            twin_opt.zero_grad(set_to_none=True)
            losses_t = []
            for xb, yb in batches:
                loss = nn.functional.cross_entropy(twin(xb), yb) / K
                loss.backward()
                losses_t.append(loss.item())
            total_t = twin_mod.clip_grads(twin, CLIP)
            lr_t = twin_opt.param_groups[0]["lr"]
            twin_opt.step()
            sched_t.step()
            out = step.optimizer_step(model, batches, max_norm=CLIP["max_norm"], schedule=sched_m,
                                      order=order)
            assert [v.item() for v in out["losses"]] == losses_t, s
            assert out["lr"] == lr_t and out["total_norm"].item() == total_t.item(), s
            clipped += int(out["clip_coef"].item() < 1)
            for name, p in twin.named_parameters():
                assert torch.equal(model.params[name], p.detach()), (s, name)
    assert 0 < clipped < STEPS, clipped
    print(f"clipped on {clipped} of {STEPS} steps")
