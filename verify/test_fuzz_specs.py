"""Property-based fuzzing over specs: manual vs autograd twin must be bitwise on CPU (or reach the
tier refnet.not_bitwise expects for the ops a spec uses), and the finite-difference and gradcheck
oracles must pass.  Names are drawn from the registries (manual.ACTIVATIONS, manual.LOSSES,
manual.OPTIMIZERS), so a new activation, loss or optimizer is fuzzed as soon as it is registered.

Example count: the "ci" profile (40) by default; `--hypothesis-profile thorough` for 500.
"""
import pytest
import torch

pytest.importorskip("hypothesis", reason="hypothesis is not installed: spec fuzzing skipped")
from hypothesis import event, given, note, strategies as st  # noqa: E402

import manual  # noqa: E402
from manual.autocast import AUTOCAST_BACKWARD
from manual.losses import target_kind
from refnet import not_bitwise
from refnet.compare import ORACLE_AUTOGRAD, meets
from refnet.harness import spec_checks
from refnet.oracles.fd import FDSettings
from refnet.settings import determinism
from refnet.spec import Spec

# Settings each optimizer may take (PyTorch's argument names), used only for registered names.
OPTIMIZER_SETTINGS = {
    "sgd": lambda d: {"lr": d(st.sampled_from([0.1, 0.01, 1e-3])),
                      **d(st.sampled_from([{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True},
                                           {"momentum": 0.5, "dampening": 0.1},
                                           {"weight_decay": 1e-2}]))},
    "adam": lambda d: {"lr": d(st.sampled_from([1e-2, 1e-3])),
                       **d(st.sampled_from([{}, {"betas": [0.8, 0.99]}, {"eps": 1e-6},
                                            {"weight_decay": 1e-2}]))},
    "adamw": lambda d: {"lr": d(st.sampled_from([1e-2, 1e-3])),
                        **d(st.sampled_from([{}, {"betas": [0.8, 0.99]}, {"weight_decay": 0.1}]))},
}
FUZZ_FD = FDSettings(per_tensor=6)


def _autocast(draw):
    """autocast and grad_scaler, drawn first (the spec then takes float32 and the activations
    autocast mirrors): off mostly, else bfloat16 or float16, ± a scaler: torch's defaults, or
    settings whose first scale is high enough to overflow now and then (float16 above 65504;
    bfloat16, float32's range, only near 2^127), with factors that are not powers of two."""
    autocast = draw(st.sampled_from([None, None, None, "bfloat16", "float16"]))
    if autocast is None:
        return None, None
    high = (12, 32) if autocast == "float16" else (110, 127)
    scaler = draw(st.one_of(st.none(), st.just(True), st.fixed_dictionaries({
        "init_scale": st.integers(*high).map(lambda e: 2.0 ** e),
        "growth_factor": st.sampled_from([2.0, 1.5]),
        "backoff_factor": st.sampled_from([0.5, 0.25, 0.3]),
        "growth_interval": st.integers(1, 4)})))
    return autocast, scaler


def _step_keys(draw, n, batch, min_rows, steps):
    """clip_grad_norm, accumulate (with k·batch ≤ n rows, each micro-batch ≥ min_rows) and
    lr_schedule, each off mostly.  -> (keys, batch_size)."""
    keys = {}
    if draw(st.integers(0, 2)) == 0:
        keys["clip_grad_norm"] = {"max_norm": draw(st.sampled_from([0.01, 0.1, 1.0, 100.0])),
                                  "norm_type": draw(st.sampled_from([2, "inf"]))}
    k = draw(st.sampled_from([1, 1, 2, 3]))
    if k > 1 and n // k >= min_rows:
        keys["accumulate"] = k
        batch = draw(st.integers(min_rows, n // k))
    if draw(st.integers(0, 2)) == 0:
        name = draw(st.sampled_from(["warmup_cosine", "cosine", "step"]))
        keys["lr_schedule"] = {"name": name, **(
            {"warmup_steps": draw(st.integers(1, steps - 1))} if name == "warmup_cosine" else
            {"min_lr": 1e-4} if name == "cosine" else
            {"step_size": draw(st.integers(1, 3)), "gamma": 0.5})}
    return keys, batch


@st.composite
def specs(draw):
    autocast, scaler = _autocast(draw)
    depth = draw(st.integers(1, 4))                       # linear layers
    sizes = [draw(st.integers(1, 64)) for _ in range(depth + 1)]
    acts = sorted(AUTOCAST_BACKWARD if autocast else manual.ACTIVATIONS)
    mixed = draw(st.booleans())
    activation = [draw(st.sampled_from(acts)) for _ in range(depth - 1)] if mixed \
        else draw(st.sampled_from(acts))
    opt_name = draw(st.sampled_from(sorted(manual.OPTIMIZERS)))
    make = OPTIMIZER_SETTINGS.get(opt_name, lambda d: {"lr": 0.01})
    norm = draw(st.sampled_from([None, None, "batchnorm", "layernorm"])) if depth > 1 else None
    embedding = None
    if draw(st.integers(0, 4)) == 0:        # now and then: integer tokens through an embedding
        embedding = {"vocab": draw(st.integers(1, 30)), "dim": draw(st.integers(1, 6)),
                     "context": draw(st.integers(1, 4))}
        sizes[0] = embedding["dim"] * embedding["context"]
    bias = draw(st.booleans())
    min_rows = 2 if norm == "batchnorm" else 1
    n = draw(st.integers(min_rows, 32))
    batch = draw(st.one_of(st.none(), st.integers(min_rows, n)))
    steps = draw(st.integers(3, 8))
    step_keys, batch = _step_keys(draw, n, batch, min_rows, steps)
    if norm == "batchnorm" and batch is not None and batch < n and n % batch == 1:
        if "accumulate" in step_keys:       # batch norm cannot train on a last batch of one row
            del step_keys["accumulate"]
        batch = None
    dropout = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])) if depth > 1 else 0.0
    dtype = "float32" if autocast else draw(st.sampled_from(["float32", "float64"]))
    return Spec(sizes=sizes, activation=activation, bias=bias,
                norm=norm, dropout=dropout, momentum=draw(st.sampled_from([0.1, 0.3])),
                eps=draw(st.sampled_from([1e-5, 1e-3])), embedding=embedding,
                loss=draw(st.sampled_from(sorted(manual.LOSSES))),
                optimizer={"name": opt_name, **make(draw)}, steps=steps,
                batch_size=batch, data="names" if embedding else "random",
                n_samples=n, dtype=dtype, autocast=autocast, grad_scaler=scaler, **step_keys,
                seed=draw(st.integers(0, 2**16)), init=draw(st.sampled_from(["uniform", "randn"])),
                k=draw(st.integers(1, 3)), name="fuzz")


def diverged_alike(check):
    """A drawn run that blew up (say randn init, lr 0.1): both sides NaN at the same steps and
    every other value bitwise.  The curve check fails it by design (NaN is never identical in a
    loss curve); here it is no disagreement, only a run with nothing more to say."""
    return check.name.startswith("loss_curve") and all(
        v.passed or (v.mismatched == 0 and v.nan_positions > 0) for v in check.verdicts)


def step_events(spec, outs):
    """What the drawn spec exercised, for hypothesis's statistics (pytest --hypothesis-show-statistics):
    autocast dtype, scaler and whether it overflowed (skipped steps), clipping active or not,
    accumulation and the schedule."""
    event(f"autocast: {spec.autocast or 'off'}" + (f" with {spec.norm}" if spec.autocast and spec.norm
                                                    else ""))
    if spec.grad_scaler not in (None, False):
        skipped = sum(not o.stepped_m for o in outs)
        event(f"grad_scaler: {'overflow, skipped steps' if skipped else 'no overflow'}")
    if spec.clip_grad_norm is not None:
        event(f"clip_grad_norm: {'active' if any(o.clipped for o in outs) else 'inactive'}")
    event(f"accumulate: {spec.accumulate}")
    event(f"lr_schedule: {(spec.lr_schedule or {}).get('name', 'off')}")


def fuzz_data(spec):
    """Seeded inputs and targets of the kind the spec's loss takes."""
    gen = torch.Generator().manual_seed(spec.seed)
    n, d, c = spec.n_samples, spec.sizes[0], spec.sizes[-1]
    if spec.embedding is not None:
        e = spec.embedding
        x = torch.randint(0, e["vocab"], (n, e["context"]), generator=gen)
    else:
        x = torch.randn((n, d), generator=gen, dtype=torch.float64).to(spec.torch_dtype)
    if target_kind(spec.loss) == "labels":
        return x, torch.randint(0, c, (n,), generator=gen)
    return x, torch.randn((n, c), generator=gen, dtype=torch.float64).to(spec.torch_dtype)


@given(spec=specs())
def test_fuzz_manual_vs_twin_cpu(spec):
    note(f"spec: {spec.to_dict()}")
    outs = []
    with determinism("cpu"):
        checks = spec_checks(spec, data=fuzz_data(spec), fd_settings=FUZZ_FD, record=outs)
    step_events(spec, outs)
    for check in checks:
        detail = "\n".join(v.message() for v in check.verdicts) + f"\n{check.note}"
        if check.oracle != ORACLE_AUTOGRAD:  # finite differences, gradcheck: must pass
            assert check.passed, f"{check.name} failed for {spec.to_dict()}:\n{detail}"
            continue
        if not check.passed and diverged_alike(check):
            event("diverged to NaN on both sides at the same steps")
            continue
        stage = "grad" if check.name == "grad@init" else "training"
        expected = not_bitwise.expected_tier(spec, "cpu", stage)
        if expected is None:  # a known non-bitwise op compounds through training: graded, reported
            event(f"{check.name} with a known non-bitwise op: {check.tier}")
            if check.name.startswith("loss_curve"):
                assert check.verdicts[0].first_divergence != 0, f"step 0 differs:\n{detail}"
            continue
        assert meets(check.tier, expected), \
            f"{check.name}: expected {expected}, got {check.tier} for {spec.to_dict()}:\n{detail}"


def test_every_registered_optimizer_has_a_settings_table():
    assert set(manual.OPTIMIZERS) <= set(OPTIMIZER_SETTINGS), "add its settings to OPTIMIZER_SETTINGS"


# -- residual FFN blocks (issue 24): their own strategy, kept apart from `specs` -----------------
@st.composite
def block_specs(draw):
    """An MLP with 1-2 residual FFN blocks: a projection (1-2 linear layers) to a small width D,
    the blocks (hidden width H, with or without layer norm, any elementwise activation), the
    head; any loss, optimizer and dtype.  nn.Linear's uniform init and rates <= 0.01: the
    residual stack has no contraction, and a larger step diverges to NaN within the few steps
    (a NaN loss never counts as identical)."""
    depth = draw(st.integers(2, 3))                       # linear layers, the head included
    sizes = [draw(st.integers(1, 12)) for _ in range(depth + 1)]
    acts = sorted(manual.ACTIVATIONS)
    blocks = {"n": draw(st.integers(1, 2)), "width": sizes[-2], "hidden": draw(st.integers(1, 16)),
              "norm": draw(st.sampled_from(["layer", None])),
              "activation": draw(st.sampled_from([a for a in acts if a != "maxout"]))}
    optimizer = {"name": draw(st.sampled_from(sorted(manual.OPTIMIZERS))),
                 "lr": draw(st.sampled_from([1e-2, 1e-3]))}
    n = draw(st.integers(1, 24))
    return Spec(sizes=sizes, activation=draw(st.sampled_from([a for a in acts if a != "maxout"])),
                bias=draw(st.booleans()), blocks=blocks,
                loss=draw(st.sampled_from(sorted(manual.LOSSES))),
                optimizer=optimizer, steps=draw(st.integers(3, 6)),
                batch_size=draw(st.one_of(st.none(), st.integers(1, n))), data="random",
                n_samples=n, dtype=draw(st.sampled_from(["float32", "float64"])),
                seed=draw(st.integers(0, 2**16)), name="fuzz_blocks")


@given(spec=block_specs())
def test_fuzz_blocks_cpu(spec):
    # the same grading as test_fuzz_manual_vs_twin_cpu: its body, run on this spec
    test_fuzz_manual_vs_twin_cpu.hypothesis.inner_test(spec)
