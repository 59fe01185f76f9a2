"""manual/step.py: k micro-batches, clipping and a schedule per optimizer step, against the stock
PyTorch loop (``(loss / k).backward()`` k times, clip_grad_norm_, opt.step(), sched.step()) —
every parameter, rate and total norm bit for bit, float32 and float64."""
import warnings

import pytest
import torch

import manual
from manual import clip, schedules, step
from manual.mlp import MLP, init_params
from refnet import twin as twin_mod

SIZES, ACT = [3, 9, 6, 2], "tanh"
ROWS = 5          # rows per micro-batch (odd: partial vector tails in every kernel)


def _data(dtype, n_batches, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * ROWS, SIZES[0], generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(n_batches * ROWS, SIZES[-1], generator=g, dtype=torch.float64).to(dtype)
    return [(x[i:i + ROWS], y[i:i + ROWS]) for i in range(0, len(x), ROWS)]


def _pair(dtype, opt_name, settings, loss="mse"):
    params = init_params(SIZES, ACT, seed=3, dtype=dtype)
    mlp = MLP({k: v.clone() for k, v in params.items()}, ACT, loss,
              manual.make_optimizer(opt_name, **settings))
    twin = twin_mod.Twin(SIZES, ACT, dtype=dtype)
    twin_mod.load_params(twin, params)
    return mlp, twin, twin_mod.make_optimizer(twin, opt_name, **settings), twin_mod.loss_module(loss)


def _twin_step(twin, opt, loss_fn, batches, max_norm, norm_type, sched):
    """The script: zero_grad, k backward passes of loss / k, clip, step, schedule."""
    opt.zero_grad(set_to_none=True)
    losses = []
    for x, y in batches:
        loss = loss_fn(twin(x), y) / len(batches)
        loss.backward()
        losses.append(loss.detach())
    total = None
    if max_norm is not None:
        total = twin_mod.clip_grads(twin, {"max_norm": max_norm, "norm_type": norm_type})
    lr = opt.param_groups[0]["lr"]
    opt.step()
    if sched is not None:
        sched.step()
    return losses, total, lr


def run_both(dtype, k, *, max_norm=None, norm_type=2.0, config=None, opt=("adamw", {"lr": 0.05}),
             steps=12):
    """Train both sides in lockstep; assert every step bitwise.  -> (clipped steps, steps)."""
    mlp, twin, twin_opt, loss_fn = _pair(dtype, *opt)
    sched_t = twin_mod.make_scheduler(twin_opt, config, steps)
    sched_m = schedules.make_schedule(config, opt[1]["lr"], steps)
    data = _data(dtype, k * steps)
    clipped = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for s in range(steps):
            batches = data[s * k:(s + 1) * k]
            losses_t, total_t, lr_t = _twin_step(twin, twin_opt, loss_fn, batches, max_norm,
                                                 norm_type, sched_t)
            out = step.optimizer_step(mlp, batches, max_norm=max_norm, norm_type=norm_type,
                                      schedule=sched_m)
            assert [v.item() for v in out["losses"]] == [v.item() for v in losses_t], s
            if config is not None:
                assert out["lr"] == lr_t, s
            if max_norm is not None:
                assert out["total_norm"].item() == total_t.item(), s
                clipped += int(out["clip_coef"].item() < 1)
            for name, p in twin.named_parameters():
                assert torch.equal(mlp.params[name], p.detach()), (s, name)
    return clipped, steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_accumulation_bitwise(dtype, k):
    run_both(dtype, k, opt=("sgd", {"lr": 0.1, "momentum": 0.9}))


def _median_norm(dtype, k, norm_type):
    """A max_norm inside the run's range of total norms, so that some steps clip and some don't."""
    mlp, _, _, _ = _pair(dtype, "adamw", {"lr": 0.05})
    norms = []
    for s in range(12):
        batches = _data(dtype, k * 12)[s * k:(s + 1) * k]
        grads, _ = step.accumulated_grads(mlp, batches)
        norms.append(float(clip.total_norm(grads, norm_type)[0]))
        mlp.step(grads)
    return sorted(norms)[len(norms) // 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("norm_type", [2.0, "inf"])
def test_clipping_with_schedule_bitwise(dtype, k, norm_type):
    max_norm = _median_norm(dtype, k, norm_type)
    config = {"name": "warmup_cosine", "warmup_steps": 3, "min_lr": 1e-3}
    clipped, steps = run_both(dtype, k, max_norm=max_norm, norm_type=norm_type, config=config)
    assert 0 < clipped < steps      # both kinds of step were met


@pytest.mark.parametrize("config", [{"name": "cosine", "min_lr": 1e-3},
                                    {"name": "step", "step_size": 4, "gamma": 0.5}])
def test_schedules_drive_the_optimizer_bitwise(config):
    run_both(torch.float32, 2, config=config, opt=("adam", {"lr": 0.05}))


def test_first_gradient_is_kept_not_added_to_zero():
    """AccumulateGrad keeps the first micro-batch's gradient as it is: −0.0 stays −0.0, where a
    zero-filled buffer would give 0 + (−0) = +0."""
    p = torch.nn.Parameter(torch.zeros(2))
    minus_zero = torch.tensor([-0.0, 1.5])
    for _ in range(2):
        p.backward(minus_zero.clone())   # leaf backward: AccumulateGrad only
    total = None
    for _ in range(2):
        total = step.accumulate_grads(total, {"p": minus_zero.clone()})
    assert torch.equal(total["p"], p.grad) and total["p"][0].item() == 0.0
    assert str(total["p"][0].item()) == str(p.grad[0].item()) == "-0.0"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_accumulate(bad):
    with pytest.raises(ValueError, match="accumulate: expected an integer >= 1"):
        step.micro_batch_seed(bad, torch.zeros(()))
