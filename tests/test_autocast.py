"""Mixed precision: manual.autocast.AutocastMLP (+ manual.grad_scaler.GradScaler) against the stock
script (refnet.twin.autocast_step: torch.autocast("cpu", dtype) forward + loss per step,
torch.amp.GradScaler, torch.optim), bit for bit at every step: loss, skip decision, scale, and
every float32 parameter.

The grid: every activation × loss × {bfloat16, float16}, each run twice (without and with a
GradScaler), the optimizer rotating over SGD (momentum, Nesterov), Adam and AdamW so that every
activation and every loss meets every optimizer, and every optimizer meets both dtypes with and
without a scaler.  Then: scalers whose first scale overflows (skips, backoff, growth), L2,
dropout, an embedding, the refusals, and two planted mistakes the comparison must catch.
"""
import itertools

import pytest
import torch

import manual
from manual import autocast as ac
from manual.autocast import AutocastMLP
from manual.grad_scaler import GradScaler
from manual.losses import target_kind
from manual.mlp import MLP, init_params
import refnet
from refnet import harness, spec as spec_mod, twin as twin_mod
from refnet.compare import compare_curves, compare_tensors

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
ACTIVATIONS = ["relu", "tanh", "sigmoid", "leaky_relu", "elu", "maxout", "identity"]
LOSSES = ["mse", "sum_squared", "cross_entropy", "svm"]
OPTIMIZERS = [("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
              ("adam", {"lr": 1e-2, "weight_decay": 1e-3}),
              ("adamw", {"lr": 1e-2, "weight_decay": 0.1})]
SIZES = [12, 18, 10, 5]           # unequal widths; maxout doubles the hidden linear layers
STEPS = 20


def _pair(act, loss, opt, reg=0.0, dropout=0.0, embedding=None, seed=0):
    """The manual net and the twin (with its loss and optimizer) from the same float32 start."""
    name, settings = opt
    params = init_params(SIZES, act, seed=seed, dtype=torch.float32, embedding=embedding)
    net = MLP({k: v.clone() for k, v in params.items()}, act, loss,
              manual.make_optimizer(name, **settings), reg=reg, dropout=dropout,
              embedding=embedding, generator=torch.Generator().manual_seed(seed))
    twin = twin_mod.Twin(SIZES, act, dtype=torch.float32, dropout=dropout, embedding=embedding,
                         seed=seed)
    twin_mod.load_params(twin, params)
    return net, (twin, twin_mod.loss_module(loss, reg, twin),
                 twin_mod.make_optimizer(twin, name, **settings))


def _batch(gen, loss, embedding=None, n=16):
    if embedding is not None:
        x = torch.randint(0, embedding["vocab"], (n, embedding["context"]), generator=gen)
    else:
        x = torch.randn(n, SIZES[0], generator=gen) * 2
    if target_kind(loss) == "values":
        return x, torch.randn(n, SIZES[-1], generator=gen)
    return x, torch.randint(0, SIZES[-1], (n,), generator=gen)


def _same(a, b):
    """Identical bits (NaN against NaN counts as the same, as a diverged run has on both sides)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(
        ((a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())).all())


def run_both(act, loss, opt, dtype, scaler=None, steps=STEPS, **layers):
    """Train both sides in lockstep; returns a list of per-step records and the first step where
    they part (None when every step is bitwise).  scaler: GradScaler settings (a dict) or None."""
    net, (twin, loss_fn, twin_opt) = _pair(act, loss, opt, **layers)
    manual_amp = AutocastMLP(net, dtype)
    ms = None if scaler is None else GradScaler(**scaler)
    ts = None if scaler is None else torch.amp.GradScaler("cpu", **scaler)
    gen = torch.Generator().manual_seed(7)
    history, parted = [], None
    for step in range(steps):
        x, target = _batch(gen, loss, layers.get("embedding"))
        m = manual_amp.train_step(x, target, ms)
        t = twin_mod.autocast_step(twin, loss_fn, twin_opt, x, target, dtype, ts)
        (loss_m, stepped_m), (loss_t, stepped_t) = (m["loss"], m["stepped"]), (t["loss"], t["stepped"])
        same = _same(loss_m, loss_t) and stepped_m == stepped_t and all(
            _same(net.params[k], p.detach()) for k, p in twin.named_parameters())
        if ms is not None:
            same = same and _same(ms.scale, ts._scale) and ms.growth_tracker == int(ts._growth_tracker)
        history.append({"stepped": stepped_m, "scale": None if ms is None else float(ms.scale)})
        if not same and parted is None:
            parted = step
    return history, parted


def _cases():
    """activation × loss × dtype; the optimizer rotates (without scaler, then with one)."""
    for (i, act), (j, loss), dtype in itertools.product(enumerate(ACTIVATIONS), enumerate(LOSSES),
                                                        DTYPES):
        yield pytest.param(act, loss, dtype, (i + j) % 3, id=f"{act}-{loss}-{dtype}")


@pytest.mark.parametrize("act, loss, dtype, k", list(_cases()))
def test_step_is_bitwise(act, loss, dtype, k):
    for scaler, opt in ((None, OPTIMIZERS[k]), ({}, OPTIMIZERS[(k + 1) % 3])):
        _, parted = run_both(act, loss, opt, DTYPES[dtype], scaler)
        assert parted is None, f"{act}/{loss}/{opt[0]}/{dtype} scaler={scaler}: parted at step {parted}"


def test_every_optimizer_meets_every_dtype_with_and_without_scaler():
    """The rotation of test_step_is_bitwise covers the grid it promises (a check of the test)."""
    seen = set()
    for p in _cases():
        act, loss, dtype, k = p.values
        seen |= {(act, OPTIMIZERS[k][0]), (loss, OPTIMIZERS[k][0]),
                 (dtype, OPTIMIZERS[k][0], False), (dtype, OPTIMIZERS[(k + 1) % 3][0], True)}
    names = [o[0] for o in OPTIMIZERS]
    assert {(a, o) for a in ACTIVATIONS for o in names} <= seen
    assert {(lo, o) for lo in LOSSES for o in names} <= seen
    assert {(d, o, s) for d in DTYPES for o in names for s in (False, True)} <= seen


# First scales that overflow: fp16 overflows at 65504, bfloat16 only near float32's 3.4e38.
OVERFLOW = {"float16": {"init_scale": 2.0 ** 40, "growth_factor": 3.0, "backoff_factor": 0.3,
                        "growth_interval": 3},
            "bfloat16": {"init_scale": 3.0e38, "growth_factor": 1.5, "backoff_factor": 0.7,
                         "growth_interval": 2}}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_scaler_whose_first_scale_overflows(dtype):
    """Skipped steps, backoff and growth, identical on both sides, scale not a power of two."""
    loss = "sum_squared" if dtype == "bfloat16" else "mse"     # bf16 needs a float32 overflow
    history, parted = run_both("sigmoid", loss, OPTIMIZERS[1], DTYPES[dtype], OVERFLOW[dtype],
                               steps=40)
    assert parted is None, f"parted at step {parted}"
    skipped = [s for s, h in enumerate(history) if not h["stepped"]]
    scales = [h["scale"] for h in history]
    assert skipped[0] == 0 and len(skipped) < len(history), skipped       # overflow, then steps
    assert any(b > a for a, b in zip(scales, scales[1:])), scales         # it grew at least once
    print(f"{dtype}: skipped steps {skipped}; scales {scales}")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_reg_dropout_and_embedding(dtype):
    dt = DTYPES[dtype]
    for layers in ({"reg": 0.05}, {"dropout": 0.3},
                   {"embedding": {"vocab": 11, "dim": 3, "context": 4}, "reg": 0.01}):
        _, parted = run_both("tanh", "cross_entropy", OPTIMIZERS[2], dt, {}, **layers)
        assert parted is None, f"{layers}: parted at step {parted}"


# -- planted mistakes: the comparison must see them ------------------------------------------------
def test_tanh_backward_all_in_bfloat16_is_caught(monkeypatch):
    """The note's trap: tanh's backward evaluated op by op in bfloat16 (instead of float32 inside,
    one rounding) is not bitwise — the grid above would fail."""
    monkeypatch.setitem(ac.AUTOCAST_BACKWARD, "tanh",
                        {torch.bfloat16: ac._in_low("tanh"), torch.float16: ac._in_low("tanh")})
    _, parted = run_both("tanh", "mse", OPTIMIZERS[1], torch.bfloat16)
    assert parted is not None
    print(f"tanh backward all in bfloat16: parted at step {parted}")


def test_unscale_by_division_is_caught(monkeypatch):
    """Unscaling g / S instead of g · float32(1/float64(S)) differs once S is not a power of two."""
    def unscale_dividing(self, grads):
        found_inf = any(not bool(torch.isfinite(g).all()) for g in grads.values())
        for g in grads.values():
            g.div_(self.scale)
        self.found_inf = found_inf
        return found_inf
    scaler = {"init_scale": 3000.0, "growth_interval": 5, "growth_factor": 1.7}
    _, parted = run_both("relu", "cross_entropy", OPTIMIZERS[1], torch.float16, scaler)
    assert parted is None                              # the real unscale: bitwise
    monkeypatch.setattr(GradScaler, "unscale_", unscale_dividing)
    _, parted = run_both("relu", "cross_entropy", OPTIMIZERS[1], torch.float16, scaler)
    assert parted is not None
    print(f"unscale by division: parted at step {parted}")


# -- GradScaler's arithmetic against torch's kernels --------------------------------------------
def test_unscale_multiplies_by_the_rounded_inverse():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(10_000, generator=gen) * 1e4
    for scale in (3000.0, 65536.0, 1.7 ** 30, 0.3):
        ours = GradScaler(init_scale=scale)
        mine = {"g": g.clone()}
        assert ours.unscale_(mine) is False
        theirs, found = g.clone(), torch.zeros(())
        torch._amp_foreach_non_finite_check_and_unscale_([theirs], found,
                                                        ours.scale.double().reciprocal().float())
        assert torch.equal(mine["g"], theirs) and float(found) == 0
    bad = {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")])}
    assert GradScaler().unscale_(bad) is True


def test_update_rounds_the_double_product_once():
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        growth = 1 + float(torch.rand((), generator=gen)) * 3
        backoff = float(torch.rand((), generator=gen)) * 0.98 + 0.01
        init = float(torch.rand((), generator=gen)) * 1e6 + 1
        found = bool(torch.rand((), generator=gen) < 0.5)
        ours = GradScaler(init, growth, backoff, growth_interval=1)
        ours.found_inf = found
        ours.update()
        scale, tracker = torch.full((), init), torch.zeros((), dtype=torch.int32)
        torch._amp_update_scale_(scale, tracker, torch.full((), float(found)), growth, backoff, 1)
        assert torch.equal(ours.scale, scale), (init, growth, backoff, found)


def test_growth_stops_at_the_float32_limit():
    s = GradScaler(init_scale=2.0 ** 126, growth_factor=2.0, growth_interval=1)
    for _ in range(3):
        s.found_inf = False
        s.update()
    assert float(s.scale) == 2.0 ** 127 and s.growth_tracker == 0


# -- refusals: one line, naming the combination --------------------------------------------------
@pytest.mark.parametrize("build, match", [
    (lambda: AutocastMLP(MLP(init_params([3, 4, 2], dtype=torch.float64)), "bfloat16"),
     "autocast: needs float32 parameters .* got float64"),
    (lambda: AutocastMLP(MLP(init_params([3, 4, 2], dtype=torch.float32)), "float8"),
     "autocast: unknown dtype 'float8'; expected one of bfloat16, float16"),
    (lambda: GradScaler(init_scale=0.0), "grad_scaler.init_scale: expected a finite number > 0"),
    (lambda: GradScaler(init_scale=1e39), "grad_scaler.init_scale: .*finite in float32"),
    (lambda: GradScaler(growth_factor=1.0), "grad_scaler.growth_factor: expected a finite number > 1"),
    (lambda: GradScaler(backoff_factor=0.0), "grad_scaler.backoff_factor: expected a finite number > 0.0 and < 1.0"),
    (lambda: GradScaler(growth_interval=0), "grad_scaler.growth_interval: expected an integer >= 1"),
])
def test_refusals_are_one_line(build, match):
    with pytest.raises(ValueError, match=match) as caught:
        build()
    assert "\n" not in str(caught.value)


# -- the spec keys --------------------------------------------------------------------------------
SPEC_ERRORS = [
    ({"autocast": "bfloat16"}, r"autocast: needs dtype float32 \(the master weights\), got dtype float64"),
    ({"autocast": "float8", "dtype": "float32"}, "autocast: unknown dtype 'float8'; expected one of "
                                                 "bfloat16, float16 or null"),
    ({"grad_scaler": True}, "grad_scaler: needs autocast"),
    ({"autocast": "float16", "dtype": "float32", "grad_scaler": {"growth_factor": 1}},
     "grad_scaler.growth_factor: expected a finite number > 1"),
    ({"autocast": "float16", "dtype": "float32", "grad_scaler": {"backoff_factor": -0.5}},
     "grad_scaler.backoff_factor: expected a finite number > 0"),
    ({"autocast": "float16", "dtype": "float32", "grad_scaler": {"init_scale": 0}},
     "grad_scaler.init_scale: expected a finite number > 0"),
    ({"autocast": "float16", "dtype": "float32", "grad_scaler": {"init_scale": 1, "scale": 2}},
     r"grad_scaler: unknown key\(s\) \['scale'\]"),
    ({"autocast": "float16", "dtype": "float32", "grad_scaler": "yes"},
     "grad_scaler: expected true, false, null or an object"),
]


@pytest.mark.parametrize("raw, match", SPEC_ERRORS, ids=[m[:30] for _, m in SPEC_ERRORS])
def test_spec_refuses_in_one_line(raw, match):
    with pytest.raises(ValueError, match=match) as caught:
        refnet.Spec.from_dict({"sizes": [2, 3, 1], **raw})
    assert "\n" not in str(caught.value)


def test_spec_refuses_a_dtype_the_device_lacks(monkeypatch):
    """torch.autocast switches itself off (with a warning) for a dtype the device lacks; the spec
    asks torch the same way and refuses.  On this CPU both dtypes are supported."""
    assert spec_mod.autocast_supported("cpu", "float16") and spec_mod.autocast_supported("cpu", "bfloat16")
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device: False)
    with pytest.raises(ValueError, match="autocast: float16 is not supported on device cpu"):
        refnet.Spec.from_dict({"sizes": [2, 3, 1], "dtype": "float32", "autocast": "float16"})


def test_spec_settings():
    spec = refnet.Spec.from_dict({"sizes": [2, 3, 1], "dtype": "float32", "autocast": "float16",
                                  "grad_scaler": {"init_scale": 1024, "growth_interval": 5}})
    assert spec.autocast_dtype is torch.float16
    assert spec.scaler_settings == {"init_scale": 1024, "growth_factor": 2.0,
                                    "backoff_factor": 0.5, "growth_interval": 5}
    assert refnet.Spec.from_dict(spec.to_dict()) == spec
    on = refnet.Spec.from_dict({"sizes": [2, 3, 1], "dtype": "float32", "autocast": "bfloat16",
                                "grad_scaler": True})
    assert on.scaler_settings == spec_mod.SCALER_DEFAULTS
    assert refnet.Spec.from_dict({"sizes": [2, 3, 1]}).autocast_dtype is None


# The two examples, from their specs: the whole curve and the final parameters bitwise.
SPEC_RUNS = {
    "spiral_bf16": {"sizes": [2, 100, 3], "activation": "relu", "loss": "cross_entropy",
                    "reg": 1e-3, "data": "spiral", "dtype": "float32", "autocast": "bfloat16",
                    "optimizer": {"name": "adamw", "lr": 1e-2}, "steps": 40},
    "circles_fp16_scaler": {"sizes": [2, 16, 16, 2], "activation": "tanh",
                            "loss": "cross_entropy", "data": "circles", "dtype": "float32",
                            "autocast": "float16", "optimizer": {"name": "adam", "lr": 1e-2},
                            "grad_scaler": {"init_scale": 2.0 ** 30, "growth_interval": 4},
                            "steps": 40},
}


@pytest.mark.parametrize("name", list(SPEC_RUNS))
def test_spec_runs_bitwise(name):
    spec = refnet.Spec.from_dict({**SPEC_RUNS[name], "name": name})
    pair = harness.build_pair(spec)
    manual_amp = AutocastMLP(pair.mlp, spec.autocast)
    settings = spec.scaler_settings
    ms = None if settings is None else GradScaler(**settings)
    ts = twin_mod.make_grad_scaler(settings, spec.device)
    x, target = refnet.load_data(spec)
    curve_m, curve_t, skipped = [], [], []
    for step in range(spec.steps):
        m = manual_amp.train_step(x, target, ms)
        t = twin_mod.autocast_step(pair.twin, pair.twin_loss, pair.twin_opt, x, target,
                                   spec.autocast_dtype, ts)
        (loss_m, stepped_m), (loss_t, stepped_t) = (m["loss"], m["stepped"]), (t["loss"], t["stepped"])
        assert stepped_m == stepped_t, step
        curve_m.append(loss_m)
        curve_t.append(loss_t)
        skipped += [] if stepped_m else [step]
    curve = compare_curves("loss_curve", torch.stack(curve_m), torch.stack(curve_t), tier="bitwise")
    assert curve.passed, curve.message()
    for k, p in pair.twin.named_parameters():
        v = compare_tensors(k, pair.mlp.params[k], p.detach(), tier="bitwise")
        assert v.passed, v.message()
    if settings is not None:
        assert skipped and skipped[0] == 0, skipped           # the first scale overflows
        print(f"{name}: skipped {skipped}, final scale {float(ms.scale)}")


def test_scaler_state_moves_between_manual_and_torch_mid_run():
    """An fp16 run with an overflowing first scale, interrupted after 11 steps: the manual scaler
    resumes from torch's state_dict (and torch's from the manual one's), and the resumed run is
    bitwise to the uninterrupted one, skipped steps included (the swap falls where the growth
    tracker is at 2 of 3, so a tracker lost in the move changes when the scale grows)."""
    settings = {"init_scale": 2.0 ** 30, "growth_factor": 1.8, "backoff_factor": 0.4,
                "growth_interval": 3}
    whole, parted = run_both("tanh", "mse", OPTIMIZERS[1], torch.float16, settings, steps=18)
    assert parted is None
    net, (twin, loss_fn, twin_opt) = _pair("tanh", "mse", OPTIMIZERS[1])
    manual_amp, gen = AutocastMLP(net, torch.float16), torch.Generator().manual_seed(7)
    ms, ts = GradScaler(**settings), torch.amp.GradScaler("cpu", **settings)
    resumed = []
    for step in range(18):
        if step == 11:   # swap the scalers' states through the other side's state_dict
            ms_state, ts_state = ms.state_dict(), ts.state_dict()
            assert ms_state["_growth_tracker"] == ts_state["_growth_tracker"] == 2
            ms, ts = GradScaler(), torch.amp.GradScaler("cpu")
            ms.load_state_dict(ts_state)
            ts.load_state_dict(ms_state)
        x, target = _batch(gen, "mse")
        stepped = manual_amp.train_step(x, target, ms)["stepped"]
        twin_mod.autocast_step(twin, loss_fn, twin_opt, x, target, torch.float16, ts)
        resumed.append({"stepped": stepped, "scale": float(ms.scale)})
        assert float(ms.scale) == ts.get_scale(), step
    assert resumed == whole
    assert not whole[0]["stepped"]
