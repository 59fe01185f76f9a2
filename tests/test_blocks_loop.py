"""Residual FFN blocks in the loop (issue 24): the spec key ``blocks`` through manual.MLP and the
twin — `verify --spec` (gradients at init of every block parameter, the curves, the final
parameters, the FD oracle), `train` with resume, FastMLP's visible fallback, the combinations
with the other optional layers, and the paths that refuse it by name."""
import json
import signal

import pytest
import torch

import manual.blocks
import refnet
from manual.fast import FastMLP
from refnet import cli, harness, not_bitwise, train as train_mod
from refnet.checkpoint import load_checkpoint, state_differences
from refnet.data import load_data
from refnet.examples import Context, get
from refnet.compare import enforce_expected
from refnet.spec import Spec

WIDTH = 8


def blocks_spec(n=2, block_norm="layer", dtype="float32", **over):
    """spiral, a tanh projection to WIDTH, n blocks, the head; AdamW, warm-up + cosine,
    clipping, 2 micro-batches per step."""
    raw = dict(sizes=[2, WIDTH, 3], activation="tanh", loss="cross_entropy", data="spiral",
               n_samples=60, batch_size=10, accumulate=2, steps=8, dtype=dtype,
               optimizer={"name": "adamw", "lr": 0.02}, clip_grad_norm={"max_norm": 0.5},
               lr_schedule={"name": "warmup_cosine", "warmup_steps": 3, "min_lr": 1e-4},
               blocks={"n": n, "width": WIDTH, "hidden": 12, "norm": block_norm,
                       "activation": "gelu"},
               name="blocks")
    return Spec(**{**raw, **over})


def block_names(spec):
    return manual.blocks.block_param_names(spec.blocks["n"], spec.blocks["norm"])


def assert_bitwise(checks):
    for check in checks:
        assert check.passed and check.tier == "bitwise", (check.name, check.tier, check.failures())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("norm", ["layer", None], ids=["layernorm", "no-norm"])
@pytest.mark.parametrize("n", [1, 2])
def test_verify_spec_with_blocks_is_bitwise(n, norm, dtype):
    spec = blocks_spec(n, norm, dtype)
    x, target = load_data(spec)
    checks = harness.twin_checks(spec, x, target, strict_bits=True)
    assert_bitwise(checks)
    names = {v.name for c in checks for v in c.verdicts}
    assert {f"{p}.grad" for p in block_names(spec)} <= names        # every block parameter
    assert {f"final.{p}" for p in block_names(spec)} <= names
    assert {"loss_curve", "lr_curve", "clip_norm_curve", "input.grad"} <= names


@pytest.mark.parametrize("norm, activation", [("layer", "gelu"), (None, "gelu"), ("layer", "relu")],
                         ids=["layernorm", "no-norm", "relu-kinks"])
def test_spec_checks_include_finite_differences_of_every_block_parameter(norm, activation):
    spec = blocks_spec(2, norm, "float64", steps=4)
    spec = Spec.from_dict({**spec.to_dict(), "blocks": {**spec.blocks, "activation": activation}})
    checks = {c.name: c for c in harness.spec_checks(spec)}
    assert all(c.passed for c in checks.values()), [c.name for c in checks.values() if not c.passed]
    fd_names = {v.name for v in checks["finite_diff"].verdicts}
    assert {f"{p}.grad" for p in block_names(spec)} <= fd_names


@pytest.mark.parametrize("over", [
    dict(norm="layernorm"), dict(norm="batchnorm"), dict(dropout=0.2), dict(reg=1e-3),
    dict(activation="relu", blocks={"n": 2, "width": WIDTH, "hidden": 12, "activation": "relu"}),
    dict(sizes=[12, WIDTH, 27], data="names", embedding={"vocab": 27, "dim": 4, "context": 3},
         n_samples=80),
    dict(sizes=[2, 6, WIDTH, 3], activation=["tanh", "identity"]),
    dict(clip_grad_norm={"max_norm": 0.2, "norm_type": "inf"}, accumulate=3,
         lr_schedule={"name": "step", "step_size": 3, "gamma": 0.5}),
], ids=["layernorm", "batchnorm", "dropout", "reg", "relu", "embedding", "deeper-projection",
        "inf-norm-k3-step"])
def test_blocks_combine_bitwise_with_the_optional_layers(over):
    spec = blocks_spec(**over)
    x, target = load_data(spec)
    assert_bitwise(harness.twin_checks(spec, x, target, strict_bits=True))


def test_train_with_blocks_resumes_bitwise(tmp_path):
    """Cut at step 3 (checkpoint 4), resumed through the warm-up's end at step 6."""
    spec = blocks_spec(steps=10, lr_schedule={"name": "warmup_cosine", "warmup_steps": 6})
    straight = train_mod.train(spec, tmp_path / "straight", check_every=2)
    assert straight["status"] == "completed" and straight["tier"] == "bitwise"

    def cut_at_3(step, loss_m, loss_t):
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    cut = train_mod.train(spec, tmp_path / "cut", check_every=2, on_step=cut_at_3)
    assert cut["status"] == "interrupted" and cut["last_checkpoint"] == 4
    resumed = train_mod.train(None, tmp_path / "cut", check_every=2, resume=tmp_path / "cut")
    assert resumed["status"] == "completed" and resumed["tier"] == "bitwise"
    assert (tmp_path / "cut" / "losses.csv").read_text() == \
        (tmp_path / "straight" / "losses.csv").read_text()
    state = load_checkpoint(tmp_path / "cut")
    assert state_differences(load_checkpoint(tmp_path / "straight"), state) == []
    assert set(block_names(spec)) <= set(state["manual_params"])


def _pair_mlp(spec):
    pair = harness.build_pair(spec)
    return pair.mlp


def test_fast_mlp_falls_back_visibly_and_keeps_the_bits():
    spec = blocks_spec(accumulate=1, clip_grad_norm=None, lr_schedule=None)
    x, target = load_data(spec)
    readable, fast_net = _pair_mlp(spec), _pair_mlp(spec)
    fast = FastMLP(fast_net)
    assert not fast.specialised and fast.fallback.startswith("blocks: 2 residual FFN block")
    for step in range(4):
        rows = slice(10 * step, 10 * step + 10)
        loss_r = readable.train_step(x[rows], target[rows])
        loss_f = fast.train_step(x[rows], target[rows])
        assert torch.equal(loss_r, loss_f), step
    for name, p in readable.params.items():
        assert torch.equal(p, fast_net.params[name]), name


def _broken_block_backward(dout, cache):
    """The residual's identity path dropped: only the branch's gradient reaches h."""
    dh, grads = ORIGINAL_BLOCK_BACKWARD(dout, cache)
    return dh - dout, grads


ORIGINAL_BLOCK_BACKWARD = manual.blocks.block_backward


def test_a_broken_residual_sum_is_caught(monkeypatch):
    monkeypatch.setattr(manual.blocks, "block_backward", _broken_block_backward)
    spec = blocks_spec(1, "layer", "float64")
    x, target = load_data(spec)
    grad = harness.twin_checks(spec, x, target, strict_bits=True)[0]
    failed = {v.name for v in grad.verdicts if not v.passed}
    assert not grad.passed and "layers.0.weight.grad" in failed and "input.grad" in failed
    assert "blocks.0.fc2.weight.grad" not in failed      # above the break: still equal


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ffn_stack_example_is_bitwise_and_clips_early(dtype):
    checks = enforce_expected(get("ffn_stack").run(Context(device="cpu", dtype=dtype)), "cpu")
    by_name = {c.name: c for c in checks}
    assert all(c.passed for c in checks), [c.name for c in checks if not c.passed]
    for name in ("grad@init", "loss_curve[40]", "final_params"):
        assert by_name[name].tier == "bitwise", name
    claim = by_name["clipping_active_early"]
    assert claim.figures["clipped_steps"] > 0 and claim.figures["clipped_late"] == 0


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("blocks, message", [
    ({"n": 1, "width": 6, "hidden": 4}, "blocks.width: 6 must equal the width the blocks sit in, "
                                        "sizes[-2]"),
    ({"n": 0, "width": WIDTH, "hidden": 4}, "blocks.n: expected an integer >= 1, got 0"),
    ({"n": 1, "width": WIDTH, "hidden": 4, "norm": "rms"}, "blocks.norm: expected 'layer' or null"),
    ({"n": 1, "width": WIDTH, "hidden": 4, "activation": "swish"},
     "blocks.activation: unknown name 'swish'"),
    ({"n": 1, "width": WIDTH, "hidden": 4, "residual": False}, "blocks.residual: unknown setting"),
])
def test_bad_blocks_one_line_from_the_cli(tmp_path, capsys, blocks, message):
    path = tmp_path / "s.json"
    raw = blocks_spec().to_dict()
    path.write_text(json.dumps({**raw, "blocks": blocks}))
    for verb in (["verify", "--spec", path], ["train", "--spec", path, "--out", tmp_path / "o"]):
        code, _, err = run(capsys, *verb)
        assert code != 0 and err.strip().count("\n") == 0 and message in err, (verb, err)


def test_autocast_refuses_blocks_by_name():
    with pytest.raises(ValueError, match="^blocks under autocast: not mirrored yet") as info:
        blocks_spec(accumulate=1, clip_grad_norm=None, autocast="bfloat16")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("verb", [["train", "--nproc", "2", "--out", "OUT"],
                                  ["verify", "--nproc", "2"], ["export", "--out", "OUT"]])
def test_nproc_and_export_refuse_blocks_by_name(tmp_path, capsys, verb):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(blocks_spec(accumulate=1, clip_grad_norm=None,
                                           lr_schedule=None).to_dict()))
    verb = [str(tmp_path / "out") if a == "OUT" else a for a in verb]
    code, _, err = run(capsys, *verb[:1], "--spec", path, *verb[1:])
    where = "--nproc" if "--nproc" in verb else "export"
    assert code != 0 and err.strip().count("\n") == 0, err
    assert err.strip().endswith(f"blocks: {where} does not carry this key yet; remove it, or run "
                                f"the spec without {where}")


def test_mlp_checks_the_block_parameters():
    spec = blocks_spec(1)
    params = harness.build_pair(spec).mlp.params
    bad = dict(params, **{"blocks.0.fc1.weight": params["blocks.0.fc1.weight"][:, :3]})
    with pytest.raises(ValueError, match=r"^params\['blocks.0.fc1.weight'\]: expected shape "
                                         r"\[12, 8\], got \[12, 3\]"):
        harness.build_pair(spec, bad)
    missing = {k: v for k, v in params.items() if k != "blocks.0.norm.bias"}
    with pytest.raises(ValueError, match=r"^params: missing 'blocks.0.norm.bias' \(blocks\)"):
        harness.build_pair(spec, missing)


def test_check_training_takes_blocks():
    assert refnet.check_training(blocks_spec(accumulate=1), tier="bitwise").verdict == "identical"


def test_both_sides_list_the_parameters_in_one_order():
    """layers, (norms,) blocks on both sides: the optimizer's and the clip's order agree."""
    pair = harness.build_pair(blocks_spec(norm="layernorm"))
    assert list(pair.mlp.params) == [name for name, _ in pair.twin.named_parameters()]
    assert list(pair.mlp.params)[-6:] == block_names(pair.spec)[-6:]


def test_the_not_bitwise_table_sees_the_blocks_ops():
    keys = not_bitwise.spec_keys(blocks_spec(activation="tanh"))
    assert {"activation:gelu", "norm:layernorm"} <= keys
    assert "norm:layernorm" not in not_bitwise.spec_keys(blocks_spec(block_norm=None))
