"""manual/clip.py against torch.nn.utils.clip_grad_norm_ and manual/schedules.py against
torch.optim.lr_scheduler: bit for bit, float32 and float64."""
import math
import warnings

import pytest
import torch

from manual import clip, schedules
from refnet import twin as twin_mod

DTYPES = [torch.float32, torch.float64]
# odd lengths: every vector tail of the norm kernel (0–7 float32 / 0–3 float64 elements) and the
# ≥ 4 float32 tails the compiler splits
SHAPES = [(7, 13), (13,), (16, 5), (1,), (3, 4), (9,), (37, 11), (64,), (5, 21), (12,), (29,)]


def _params_with_grads(dtype, scale, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return params


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", [2.0, "inf"])
@pytest.mark.parametrize("active", [True, False], ids=["clipping", "not-clipping"])
def test_clip_matches_clip_grad_norm_bitwise(dtype, norm_type, active):
    for seed, scale in enumerate((1e-3, 0.37, 1.0, 250.0)):
        params = _params_with_grads(dtype, scale, seed)
        grads = {i: p.grad.clone() for i, p in enumerate(params)}
        unclipped, _ = clip.total_norm(grads, norm_type)
        max_norm = float(unclipped) * (0.3 if active else 1.5)
        total_t = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
        clipped, total_m, coef = clip.clip_grad_norm(grads, max_norm, norm_type)
        assert total_m.dtype == total_t.dtype == dtype
        assert total_m.item() == total_t.item(), (seed, total_m.item(), total_t.item())
        assert (coef.item() < 1) == active
        for i, p in enumerate(params):
            assert torch.equal(clipped[i], p.grad), (seed, i)


@pytest.mark.parametrize("dtype", DTYPES)
def test_coefficient_over_many_max_norms(dtype):
    """``max_norm / (N + 1e-6)`` is torch's ``reciprocal(N + 1e-6) * max_norm`` (Python's
    float / Tensor), two roundings: a true division differs on about 1 max_norm in 4."""
    params = _params_with_grads(dtype, 1.0, shapes=[(6, 5), (6,)])
    grads = {i: p.grad.clone() for i, p in enumerate(params)}
    for i in range(60):
        max_norm = 0.05 + i * 0.0731
        for p, g in zip(params, grads.values()):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        clipped, _, _ = clip.clip_grad_norm(grads, max_norm)
        for j, p in enumerate(params):
            assert torch.equal(clipped[j], p.grad), (max_norm, j)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_per_tensor_norm_every_length(dtype, threads):
    """Every vector-tail length, over several magnitudes: the kernel's lane order and sqrt (one
    output: the kernel never splits it over threads, above GRAIN_SIZE = 32768 elements too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _norms_every_length(dtype)
    finally:
        torch.set_num_threads(before)


def _norms_every_length(dtype):
    g = torch.Generator().manual_seed(1)
    for n in list(range(1, 70)) + [255, 256, 257, 1000, 4099, 40000]:
        for scale in (1e-4, 1.0, 3e3):
            t = (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)
            assert clip.tensor_norm(t).item() == torch.linalg.vector_norm(t).item(), (n, scale)
            assert clip.tensor_norm(t, "inf").item() == torch.linalg.vector_norm(t, math.inf).item()


def test_nonfinite_gradients_scale_like_torch():
    """An inf gradient: total norm inf, coefficient 0, inf·0 = NaN, as clip_grad_norm_ (no error)."""
    params = _params_with_grads(torch.float32, 1.0, shapes=[(3,), (4,)])
    params[1].grad[2] = math.inf
    grads = {i: p.grad.clone() for i, p in enumerate(params)}
    total_t = torch.nn.utils.clip_grad_norm_(params, 1.0)
    clipped, total_m, _ = clip.clip_grad_norm(grads, 1.0)
    assert total_m.item() == total_t.item() == math.inf
    for i, p in enumerate(params):
        assert torch.equal(clipped[i].isnan(), p.grad.isnan())
        assert torch.equal(torch.nan_to_num(clipped[i]), torch.nan_to_num(p.grad))


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, "1", True])
def test_bad_max_norm(bad):
    with pytest.raises(ValueError, match="max_norm: expected a finite number > 0"):
        clip.clip_grad_norm({"w": torch.ones(2)}, bad)


@pytest.mark.parametrize("bad", [1, 3, "two", None, True])
def test_bad_norm_type(bad):
    with pytest.raises(ValueError, match="norm_type: expected 2 or 'inf'"):
        clip.check_norm_type(bad)


# --- schedules -------------------------------------------------------------------------------
def torch_rates(config, lr, steps, n):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = twin_mod.make_scheduler(opt, config, steps)
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # no backward before opt.step: nothing to update
        for _ in range(n):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return rates


CASES = [
    ({"name": "warmup_cosine", "warmup_steps": 5, "min_lr": 1e-4}, 0.1, 40),
    ({"name": "warmup_cosine", "warmup_steps": 1, "min_lr": 0.0}, 3e-3, 7),
    ({"name": "warmup_cosine", "warmup_steps": 13, "min_lr": 1e-5, "start_factor": 0.01}, 0.7, 100),
    ({"name": "cosine", "min_lr": 1e-3}, 0.05, 30),
    ({"name": "cosine"}, 1, 17),
    ({"name": "step", "step_size": 3, "gamma": 0.7}, 0.1, 20),
    ({"name": "step", "step_size": 1}, 0.3, 9),
]


@pytest.mark.parametrize("config,lr,steps", CASES, ids=[f"{c['name']}-{s}" for c, _, s in CASES])
def test_schedule_rates_bitwise(config, lr, steps):
    """Every rate, across the warm-up / cosine milestone and past T_max (its restart branch)."""
    n = steps + 5
    expected = torch_rates(config, lr, steps, n)
    got = schedules.learning_rates(schedules.make_schedule(config, lr, steps), n)
    assert [r.hex() for r in got] == [float(r).hex() for r in expected]


def test_recursion_is_not_the_closed_form():
    """The point of mirroring the recursion: the closed form parts from torch in the last bits."""
    config, lr, steps = {"name": "cosine", "min_lr": 1e-3}, 0.05, 30
    expected = torch_rates(config, lr, steps, steps)
    closed = [1e-3 + (lr - 1e-3) * (1 + math.cos(math.pi * t / steps)) / 2 for t in range(steps)]
    assert closed != expected


def test_schedule_resumes_from_its_state():
    config, lr, steps = {"name": "warmup_cosine", "warmup_steps": 4, "min_lr": 1e-4}, 0.1, 12
    straight = schedules.learning_rates(schedules.make_schedule(config, lr, steps), steps)
    first = schedules.make_schedule(config, lr, steps)
    head = schedules.learning_rates(first, 4)     # stop on the milestone
    second = schedules.make_schedule(config, lr, steps)
    second.load_state_dict(first.state_dict())
    assert head + schedules.learning_rates(second, steps - 4) == straight


@pytest.mark.parametrize("config,steps,message", [
    ({"name": "linear"}, 10, "lr_schedule.name: unknown schedule 'linear'"),
    ({"name": "warmup_cosine", "warmup_steps": 10, "min_lr": 0.0}, 10,
     r"warm-up \(10 steps\) must be shorter than the run \(10 steps\)"),
    ({"name": "warmup_cosine", "warmup_steps": 0}, 10, "warmup_steps: expected an integer >= 1"),
    ({"name": "warmup_cosine", "warmup_steps": 2, "start_factor": 0}, 10, "start_factor"),
    ({"name": "cosine", "min_lr": -1}, 10, "min_lr: expected a number"),
    ({"name": "step", "gamma": 0.5}, 10, "step_size: expected an integer >= 1"),
    ({"name": "step", "step_size": 2, "warmup_steps": 1}, 10, "warmup_steps: not a setting of 'step'"),
    ("cosine", 10, "expected an object with a 'name'"),
])
def test_bad_schedule(config, steps, message):
    with pytest.raises(ValueError, match=message):
        schedules.schedule_settings(config, steps)
