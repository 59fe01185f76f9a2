"""manual.fast_step.FastStep and FastMLP under autocast: the same bits as the readable step.

FastStep (schedules, clipping, accumulation over a FastMLP) against manual.step.optimizer_step on
a readable copy; FastMLP(mlp, autocast=…) against manual.autocast.AutocastMLP.train_step.  The
readable ones are held bitwise against torch (tests/test_step.py, tests/test_autocast.py)."""
import pytest
import torch

import manual
from manual.autocast import AutocastMLP
from manual.fast import FastMLP
from manual.fast_step import FastStep
from manual.mlp import MLP, init_params
from manual.schedules import make_schedule
from manual.step import optimizer_step


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.int32 if a.element_size() == 4 else torch.int16),
        b.contiguous().view(torch.int32 if b.element_size() == 4 else torch.int16)) \
        if a.element_size() in (2, 4) else torch.equal(a.view(torch.int64), b.view(torch.int64))


def nets(opt, act="relu", loss="cross_entropy", sizes=(6, 24, 5), dtype=torch.float32, seed=3):
    params = init_params(list(sizes), act, True, seed=seed, dtype=dtype)
    name, settings = opt["name"], {k: v for k, v in opt.items() if k != "name"}
    return [MLP({k: v.clone() for k, v in params.items()}, act, loss,
                manual.make_optimizer(name, **settings)) for _ in range(2)]


def batches(n_steps, k, n=19, sizes=(6, 24, 5), labels=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n_steps):
        step = []
        for _ in range(k):
            x = torch.randn((n, sizes[0]), generator=gen, dtype=torch.float64).mul_(2).to(dtype)
            t = torch.randint(0, sizes[-1], (n,), generator=gen) if labels else \
                torch.randn((n, sizes[-1]), generator=gen, dtype=torch.float64).to(dtype)
            step.append((x, t))
        out.append(step)
    return out


def assert_same_run(fast_step, readable, steps, settings):
    for i, micro in enumerate(steps):
        got = fast_step.step(micro)
        want = optimizer_step(readable, micro, **settings)
        assert got["lr"] == want["lr"], (i, got["lr"], want["lr"])
        for a, b in zip(got["losses"], want["losses"]):
            assert same_bits(a, b), (i, a.item(), b.item())
        for key in ("total_norm", "clip_coef"):
            assert (got[key] is None) == (want[key] is None), key
            assert got[key] is None or same_bits(got[key], want[key]), (i, key)
    for name, p in fast_step.fast.mlp.params.items():
        assert same_bits(p, readable.params[name]), name


SCHEDULES = [{"name": "warmup_cosine", "warmup_steps": 3, "min_lr": 1e-4},
             {"name": "cosine", "min_lr": 0.0},
             {"name": "step", "step_size": 2, "gamma": 0.5}]
OPTS = [{"name": "sgd", "lr": 0.05, "momentum": 0.9},
        {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1}]


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: o["name"])
@pytest.mark.parametrize("config", SCHEDULES, ids=lambda c: c["name"])
def test_schedules_run_on_the_fast_path_bitwise(config, opt):
    """The rate changes every step (across each schedule's boundaries); the fast update reads it."""
    readable, net = nets(opt)
    steps = batches(8, 1)
    fast = FastStep(FastMLP(net), schedule=make_schedule(config, opt["lr"], 8))
    assert fast.fallback is None
    assert_same_run(fast, readable, steps,
                    {"schedule": make_schedule(config, opt["lr"], 8)})


@pytest.mark.parametrize("norm_type", [2, "inf"])
@pytest.mark.parametrize("max_norm", [0.05, 1e4], ids=["active", "inactive"])
def test_clipping_runs_on_the_fast_path_bitwise(max_norm, norm_type):
    opt = OPTS[1]
    readable, net = nets(opt, act="tanh", loss="mse")
    order = list(reversed(list(net.params)))   # any order the caller names is the one used
    fast = FastStep(FastMLP(net), max_norm=max_norm, norm_type=norm_type, order=order,
                    schedule=make_schedule(SCHEDULES[0], opt["lr"], 5))
    assert fast.fallback is None
    assert_same_run(fast, readable, batches(5, 1, labels=False),
                    {"max_norm": max_norm, "norm_type": float(norm_type) if norm_type == 2
                     else float("inf"), "order": order,
                     "schedule": make_schedule(SCHEDULES[0], opt["lr"], 5)})


@pytest.mark.parametrize("k", [2, 3])
def test_accumulation_falls_back_visibly_and_bitwise(k):
    readable, net = nets(OPTS[0])
    fast = FastStep(FastMLP(net), accumulate=k, max_norm=0.5,
                    schedule=make_schedule(SCHEDULES[2], OPTS[0]["lr"], 4))
    assert fast.fallback is not None and f"accumulate {k}" in fast.fallback
    assert_same_run(fast, readable, batches(4, k),
                    {"max_norm": 0.5, "schedule": make_schedule(SCHEDULES[2], OPTS[0]["lr"], 4)})


def test_fast_step_bad_input_is_one_line():
    _, net = nets(OPTS[0])
    with pytest.raises(ValueError, match="accumulate: expected an integer >= 1"):
        FastStep(FastMLP(net), accumulate=0)
    with pytest.raises(TypeError, match="fast: expected a manual.fast.FastMLP"):
        FastStep(net)
    with pytest.raises(ValueError, match="batches: expected 1 micro-batches, got 2"):
        FastStep(FastMLP(net)).step(batches(1, 2)[0])
    with pytest.raises(ValueError, match="under autocast are not mirrored"):
        FastStep(FastMLP(net, autocast="bfloat16"), accumulate=2)
    with pytest.raises(ValueError, match="no specialised step to run; autocast bfloat16"):
        FastMLP(net, autocast="bfloat16").forward_backward(*batches(1, 1)[0][0])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", [("relu", "cross_entropy", OPTS[1]),
                                  ("tanh", "mse", OPTS[0]), ("sigmoid", "sum_squared", OPTS[0])],
                         ids=lambda c: c[0])
def test_autocast_falls_back_visibly_and_bitwise(case, dtype):
    act, loss, opt = case
    readable, net = nets(opt, act=act, loss=loss)
    amp, fast = AutocastMLP(readable, dtype), FastMLP(net, autocast=dtype)
    assert not fast.specialised and f"autocast {dtype}" in fast.fallback
    for micro in batches(4, 1, labels=loss == "cross_entropy"):
        (x, t), = micro
        want = amp.train_step(x, t)["loss"]
        assert same_bits(fast.train_step(x, t), want)
    for name, p in net.params.items():
        assert same_bits(p, readable.params[name]), name


def test_a_schedule_runs_under_autocast():
    readable, net = nets(OPTS[1])
    amp = AutocastMLP(readable, "bfloat16")
    fast = FastStep(FastMLP(net, autocast="bfloat16"),
                    schedule=make_schedule(SCHEDULES[1], OPTS[1]["lr"], 4))
    schedule = make_schedule(SCHEDULES[1], OPTS[1]["lr"], 4)
    for micro in batches(4, 1):
        readable.optimizer.lr = schedule.lr
        want = amp.train_step(*micro[0])["loss"]
        schedule.step()
        got = fast.step(micro)
        assert same_bits(got["losses"][0], want) and got["lr"] == readable.optimizer.lr
    for name, p in net.params.items():
        assert same_bits(p, readable.params[name]), name
