"""Golden fixtures of the modern step: BF16/F16 tensors, autocast (bf16, fp16 + GradScaler with
overflow skips), clipping, accumulation and schedules; exported, run through the NumPy port and
graded by check-port (docs/porting.md)."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from refnet import cli, portcheck, tensorfile
from refnet.cli.export import cases_for
from tests.test_golden import check, export_and_port, load_port

BF16 = {"name": "bf16", "sizes": [2, 16, 8, 3], "activation": ["tanh", "sigmoid"],
        "loss": "cross_entropy", "data": "spiral", "n_samples": 60, "batch_size": 20, "steps": 6,
        "dtype": "float32", "autocast": "bfloat16", "reg": 1e-3,
        "lr_schedule": {"name": "step", "step_size": 2, "gamma": 0.5},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}}
# the first scale overflows float16: skipped steps, backoff, growth after 3 clean steps
FP16 = {"name": "fp16", "sizes": [2, 16, 16, 2], "activation": ["tanh", "sigmoid"],
        "loss": "cross_entropy", "data": "circles", "n_samples": 40, "batch_size": 20, "steps": 12,
        "dtype": "float32", "autocast": "float16",
        "grad_scaler": {"init_scale": 2.0 ** 24, "growth_interval": 3},
        "lr_schedule": {"name": "cosine", "min_lr": 0.01}, "optimizer": {"name": "sgd", "lr": 0.1}}
# clipping active on the first step only, 3 micro-batches per step, warm-up then cosine
STEP = {"name": "step", "sizes": [2, 6, 5, 2], "activation": ["tanh", "relu"], "loss": "mse",
        "data": "circles", "n_samples": 24, "batch_size": 4, "steps": 6, "accumulate": 3,
        "clip_grad_norm": {"max_norm": 0.9},
        "lr_schedule": {"name": "warmup_cosine", "warmup_steps": 2, "min_lr": 0.01},
        "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.9}}
STEP_INF = {"name": "step_inf", "sizes": [2, 5, 3], "activation": "sigmoid",
            "loss": "cross_entropy", "data": "spiral", "n_samples": 30, "batch_size": 5,
            "steps": 5, "accumulate": 2, "clip_grad_norm": {"max_norm": 0.2, "norm_type": "inf"},
            "dtype": "float64", "reg": 1e-3, "optimizer": {"name": "sgd", "lr": 0.5}}


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """bf16.float32, fp16.float32, step.float32, step.float64, step_inf.float64: exported, and
    the NumPy port's outputs for them (the documented command)."""
    base = tmp_path_factory.mktemp("golden_steps")
    cases = []
    for spec in (BF16, FP16, STEP, STEP_INF):
        path = base / f"{spec['name']}.json"
        path.write_text(json.dumps(spec))
        cases += cases_for(None, str(path), "all" if spec is STEP else None)
    return export_and_port(base, cases)


def _rows(port_out, fixtures):
    return {(r["case"], r["name"]): r for r in portcheck.check_port(str(port_out), str(fixtures))}


def _tensors(directory, case):
    return tensorfile.decode_safetensors((directory / f"{case}.safetensors").read_bytes())[0]


def _bits(t):
    return t.reshape(-1).view(torch.uint8)


# --- the file format -----------------------------------------------------------------------
def test_bf16_f16_and_bool_round_trip_exactly_both_ways():
    st = pytest.importorskip("safetensors.torch")
    raw = torch.tensor([0x7FC1, 0x8000 - 65536, 0x0001, 0x7F80, -1, 0x3F80, 0x0080, 0xFF7F - 65536],
                       dtype=torch.int16)       # NaN payload, −0, subnormal, inf, …
    tensors = {"bf": raw.view(torch.bfloat16).reshape(2, 4), "half": raw.clone().view(torch.float16),
               "bf_scalar": torch.tensor(1.5, dtype=torch.bfloat16),
               "flags": torch.tensor([True, False, True]),
               "empty": torch.empty(0, 3, dtype=torch.float16)}
    ours = tensorfile.encode_safetensors(tensors)
    for got in (tensorfile.decode_safetensors(ours)[0], st.load(ours),
                tensorfile.decode_safetensors(st.save(tensors))[0]):
        assert set(got) == set(tensors)
        for name, t in tensors.items():
            assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
            assert torch.equal(_bits(got[name]), _bits(t)), name
    header_end = 8 + int.from_bytes(ours[:8], "little")
    assert json.loads(ours[8:header_end])["bf"]["dtype"] == "BF16"


def _with_header(header, data):
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + data


def test_an_unknown_dtype_or_a_bad_bool_byte_is_refused_naming_the_tensor():
    blob = _with_header({"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"ab")
    with pytest.raises(ValueError, match=r"^port\.safetensors: tensor 'x': dtype 'F8_E4M3' not "
                                         r"supported; expected one of F32, F64, BF16, F16, I64, "
                                         r"BOOL$"):
        tensorfile.decode_safetensors(blob, "port.safetensors")
    blob = _with_header({"m": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02")
    with pytest.raises(ValueError, match=r"tensor 'm': BOOL data holds a byte other than 0 or 1"):
        tensorfile.decode_safetensors(blob, "port.safetensors")


def test_port_reads_and_writes_bf16_f16_bool_exactly(tmp_path):
    port = load_port()
    raw = torch.tensor([0x7F7F, 0x8000 - 65536, 0x0001, 0x7F80, 0x3F80], dtype=torch.int16)
    tensors = {"bf": raw.view(torch.bfloat16), "half": raw.view(torch.float16),
               "flags": torch.tensor([True, False])}
    path = tmp_path / "t.safetensors"
    path.write_bytes(tensorfile.encode_safetensors(tensors))
    arrays = port.read_safetensors(str(path))
    assert arrays["bf"].dtype == np.float32 and arrays["half"].dtype == np.float16
    assert np.array_equal(arrays["bf"], tensors["bf"].float().numpy())
    out = tmp_path / "back.safetensors"
    port.write_safetensors(str(out), arrays, {"bf": "BF16", "half": "F16", "flags": "BOOL"})
    back = tensorfile.decode_safetensors(out.read_bytes())[0]
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(_bits(back[name]), _bits(t)), name


def test_port_writer_refuses_a_wrong_dtype_naming_the_tensor(tmp_path):
    port = load_port()
    with pytest.raises(ValueError, match=r"^tensor 'a': the port computed float32, the fixture "
                                         r"lists F16$"):
        port.write_safetensors(str(tmp_path / "x"), {"a": np.zeros(2, np.float32)}, {"a": "F16"})
    with pytest.raises(ValueError, match=r"^tensor 'b': expected bfloat16 values"):
        port.write_safetensors(str(tmp_path / "x"), {"b": np.float32([1.1])}, {"b": "BF16"})


def test_port_rounds_to_bfloat16_as_torch_casts():
    """round_bf16 (uint32 bit arithmetic) against torch's float32 -> bfloat16 cast: ties to even,
    overflow to inf, subnormals, NaN, −0, bit for bit."""
    port = load_port()
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (200_000,), generator=gen, dtype=torch.int64)
    special = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7FFFFF, 0x7F7F8000, 0x00008000,
               0x80000000, 0x7FC00001, 0x7F800001, 0x00000001, 0xFF7F8000]     # ties, limits, NaN
    x = torch.cat([bits, torch.tensor(special)]).to(torch.int32).view(torch.float32)
    got = torch.from_numpy(port.round_bf16(x.numpy()).view(np.uint32).astype(np.int64))
    want = x.to(torch.bfloat16).float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = torch.isnan(x)
    assert torch.equal(got[~nan], want[~nan])
    assert bool(torch.isnan(torch.from_numpy(port.round_bf16(x[nan].numpy()))).all())


# --- export -> port -> check-port ------------------------------------------------------------
def test_every_new_fixture_kind_passes_check_port(steps, capsys):
    fixtures, port_out = steps
    rc, out, err = check(capsys, port_out)
    assert rc == 0, out + err
    manifest = json.loads((fixtures / "manifest.json").read_text())
    n = sum(1 for c in manifest["cases"] for t in c["tensors"] if t["kind"])
    assert f"{n}/{n} tensors pass" in out and "first fails" not in out
    dtypes = {c["name"]: {t["name"]: t["dtype"] for t in c["tensors"]} for c in manifest["cases"]}
    assert dtypes["bf16.float32"]["forward.layers.0.activation"] == "BF16"
    assert dtypes["bf16.float32"]["forward.loss"] == "F32"
    assert dtypes["bf16.float32"]["grads.layers.0.weight"] == "F32"
    assert dtypes["fp16.float32"]["backward.casts.layers.1.grad_weight"] == "F16"
    assert dtypes["fp16.float32"]["train.skipped"] == "BOOL"
    assert dtypes["step.float32"]["train.lr"] == "F64"
    tol = {t["name"]: t for t in manifest["cases"][0]["tensors"]}
    assert tol["forward.output"]["ulp_limit"] == 2 and tol["forward.output"]["rtol"] == 1.6e-2
    # the reference is bitwise against autograd: the float32 loss and gradients under autocast,
    # the rates, norms, scale, skips and the summed micro-batch gradients
    for case in manifest["cases"]:
        tiers = {t["name"]: t.get("autograd_tier") for t in case["tensors"]}
        assert tiers["forward.loss"] == tiers["train.losses"] == "bitwise"
        for name in ("train.lr", "train.clip.total_norm", "train.scaler.scale", "train.skipped",
                     "train.grads.layers.0.weight"):
            assert tiers.get(name, "bitwise") == "bitwise", (case["name"], name)


def test_casts_and_the_scaler_history_are_bitwise_in_the_port(steps):
    """A cast is one rounding (the port's round_bf16 / float16 cast must give torch's bits), and
    the GradScaler's scale, found_inf, skips and tracker are exact: all bitwise, and the fp16
    run really skips (the first scale overflows) and then steps and grows."""
    fixtures, port_out = steps
    rows = _rows(port_out, fixtures)
    for (case, name), r in rows.items():
        if ".casts.layers" in name and ("weight" in name or "bias" in name or "input" in name) \
                and name.startswith("forward."):
            assert r["tier"] == "bitwise", (case, name, r)
    for name in ("train.scaler.scale", "train.scaler.found_inf", "train.skipped",
                 "final.scaler.scale", "final.scaler.growth_tracker"):
        assert rows[("fp16.float32", name)]["tier"] == "bitwise", name
    t = _tensors(fixtures, "fp16.float32")
    skipped = t["train.skipped"].tolist()
    assert skipped[0] and not all(skipped) and torch.equal(t["train.skipped"],
                                                           t["train.scaler.found_inf"])
    scale = t["train.scaler.scale"].tolist()
    assert scale[0] == 2.0 ** 24 and any(b > a for a, b in zip(scale, scale[1:]))  # backoff, growth


def test_schedules_clipping_and_accumulation_are_graded(steps):
    """The rates are the schedulers' own recursion: bitwise.  Clipping is active on some steps and
    not on others; the port's norms, coefficients and summed gradients pass."""
    fixtures, port_out = steps
    rows = _rows(port_out, fixtures)
    for case in ("step.float32", "step.float64", "bf16.float32", "fp16.float32"):
        assert rows[(case, "train.lr")]["tier"] == "bitwise", case
    for case in ("step.float32", "step.float64", "step_inf.float64"):
        t = _tensors(fixtures, case)
        coef = t["train.clip.coef"]
        assert bool((coef < 1).any()) and bool((coef == 1).any()), (case, coef)
        for name in ("train.clip.total_norm", "train.clip.coef", "train.grads.layers.1.weight",
                     "final.layers.0.weight"):
            assert rows[(case, name)]["passed"], (case, name)
    lr = _tensors(fixtures, "step.float64")["train.lr"].tolist()
    assert lr[0] == pytest.approx(0.1) and lr[2] == 0.2 and lr[-1] < lr[2]   # warm-up, cosine


AUTOCAST_MORE = {
    "leaky_elu_bf16": dict(sizes=[2, 8, 8, 8, 2], activation=["leaky_relu", "elu", "relu"],
                           loss="mse", autocast="bfloat16"),
    "leaky_elu_fp16": dict(sizes=[2, 8, 8, 8, 2], activation=["leaky_relu", "elu", "relu"],
                           loss="mse", autocast="float16", grad_scaler=True),
    "maxout_svm_nobias": dict(sizes=[2, 8, 4, 2], activation=["maxout", "identity"], loss="svm",
                              autocast="bfloat16", bias=False),
    "maxout_sigmoid_reg": dict(sizes=[2, 8, 4, 2], activation=["maxout", "sigmoid"],
                               loss="sum_squared", autocast="float16", reg=0.01),
}


def test_every_mirrored_activation_and_loss_under_autocast_passes(tmp_path, capsys):
    """The other activations autocast mirrors (leaky_relu, elu, relu, maxout, identity), every
    loss, no bias, reg, SGD with Nesterov and weight decay, each dtype: the port passes."""
    cases = []
    for name, over in AUTOCAST_MORE.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"name": name, "data": "circles", "n_samples": 32,
                                    "batch_size": 16, "steps": 5, "dtype": "float32",
                                    "optimizer": {"name": "sgd", "lr": 0.1, "nesterov": True,
                                                  "momentum": 0.5, "weight_decay": 0.01},
                                    **over}))
        cases += cases_for(None, str(path), None)
    fixtures, port_out = export_and_port(tmp_path, cases)
    rc, out, err = check(capsys, port_out, fixtures)
    assert rc == 0 and "first fails" not in out, out + err


def _rewrite(path, edit):
    tensors, meta = tensorfile.decode_safetensors(path.read_bytes())
    edit(tensors)
    path.write_bytes(tensorfile.encode_safetensors(tensors, meta))


def _flip(name, bit):
    def edit(tensors):
        t = tensors[name].clone()
        flat = t.reshape(-1).view(torch.int16)
        flat[3] ^= 1 << bit
        tensors[name] = t
    return edit


@pytest.mark.parametrize("bit, says", [(0, "first differs at"), (6, "first fails at")])
def test_one_wrong_bf16_bit_is_caught_and_named(steps, tmp_path, capsys, bit, says):
    """The lowest mantissa bit of one element: 1 bf16 ulp, named as where the port first differs
    (its tier is ulp); the highest (bit 6, a 2⁻¹ relative change): the port fails there."""
    fixtures, port_out = steps
    bad = tmp_path / "port"
    shutil.copytree(port_out, bad)
    (bad / "manifest.json").unlink()
    name = "forward.casts.layers.0.weight"
    _rewrite(bad / "bf16.float32.safetensors", _flip(name, bit))
    rc, out, _ = check(capsys, bad, fixtures)
    assert f"your port {says} bf16.float32/{name}" in out, out
    row = _rows(bad, fixtures)[("bf16.float32", name)]
    if bit == 0:
        assert rc == 0 and row["tier"] == "ulp" and row["max_ulp"] == 1
    else:
        assert rc == 1 and not row["passed"]


def test_a_port_tensor_in_the_wrong_dtype_is_a_failed_row_naming_it(steps, tmp_path, capsys):
    fixtures, port_out = steps
    bad = tmp_path / "port"
    shutil.copytree(port_out, bad)
    (bad / "manifest.json").unlink()
    name = "forward.layers.1.activation"

    def to_float32(tensors):
        tensors[name] = tensors[name].float()
    _rewrite(bad / "bf16.float32.safetensors", to_float32)
    rc, out, _ = check(capsys, bad, fixtures)
    assert rc == 1 and f"your port first fails at bf16.float32/{name}" in out
    assert f"tensor '{name}' is F32 [60, 8], expected BF16 [60, 8]" in out


def test_a_fixture_whose_dtype_disagrees_with_its_manifest_is_refused_in_one_line(steps, tmp_path,
                                                                                capsys):
    fixtures, port_out = steps
    bad = tmp_path / "fixtures"
    shutil.copytree(fixtures, bad)
    name = "forward.layers.0.pre_activation"
    path = bad / "fp16.float32.safetensors"

    def to_bf16(tensors):
        tensors[name] = tensors[name].to(torch.bfloat16)
    _rewrite(path, to_bf16)
    manifest = json.loads((bad / "manifest.json").read_text())
    case = next(c for c in manifest["cases"] if c["name"] == "fp16.float32")
    case["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()    # a consistent, wrong file
    (bad / "manifest.json").write_text(json.dumps(manifest))
    rc, out, err = check(capsys, port_out, bad)
    assert rc == 2 and err.count("\n") == 1
    assert f"tensor '{name}' is BF16 [40, 16], manifest.json says F16 [40, 16]" in err


# two pre-LN blocks (gelu) with clipping, 2 micro-batches and AdamW; one block without a norm
BLOCKS = {"name": "blocks", "sizes": [2, 8, 6, 3], "activation": ["relu", "tanh"],
          "loss": "cross_entropy", "data": "spiral", "n_samples": 30, "batch_size": 5, "steps": 4,
          "accumulate": 2, "blocks": {"n": 2, "width": 6, "hidden": 12, "activation": "gelu"},
          "clip_grad_norm": {"max_norm": 0.5}, "optimizer": {"name": "adamw", "lr": 0.01}}
BLOCK_NO_NORM = {"name": "block_no_norm", "sizes": [2, 5, 2], "activation": "identity",
                 "loss": "mse", "data": "circles", "n_samples": 16, "steps": 3,
                 "blocks": {"n": 1, "width": 5, "hidden": 7, "norm": None, "activation": "silu"},
                 "lr_schedule": {"name": "cosine"}, "optimizer": {"name": "sgd", "lr": 0.1}}


@pytest.fixture(scope="module")
def block_fixtures(tmp_path_factory):
    base = tmp_path_factory.mktemp("golden_blocks")
    cases = []
    for spec, dtype in ((BLOCKS, "all"), (BLOCK_NO_NORM, None)):
        path = base / f"{spec['name']}.json"
        path.write_text(json.dumps(spec))
        cases += cases_for(None, str(path), dtype)
    return export_and_port(base, cases)


def test_residual_blocks_export_and_pass_check_port(block_fixtures, capsys):
    """Every block value (LN, fc1, activation, fc2's branch, the residual output) and gradient
    (at the block's output, activation, z, LN's output, the branch at h; the parameters) is in
    the fixture, bitwise against autograd, and the port's blocks pass."""
    fixtures, port_out = block_fixtures
    rc, out, err = check(capsys, port_out)
    assert rc == 0 and "first fails" not in out, out + err
    manifest = json.loads((fixtures / "manifest.json").read_text())
    names = {c["name"]: {t["name"]: t for t in c["tensors"]} for c in manifest["cases"]}
    two = names["blocks.float64"]
    for name in ("forward.blocks.1.norm", "forward.blocks.1.branch", "forward.blocks.output",
                 "backward.blocks.0.grad_branch", "backward.blocks.grad_input",
                 "train.grads.blocks.1.fc2.weight", "final.blocks.0.norm.bias"):
        assert name in two, name
    assert two["grads.blocks.0.fc1.weight"]["autograd_tier"] == "bitwise"
    assert "forward.blocks.0.norm" not in names["block_no_norm.float64"]


def test_isolated_residual_adds_are_bitwise_and_a_dropped_identity_path_is_caught(
        block_fixtures, tmp_path, capsys, monkeypatch):
    """--isolate: the residual add (h + v) and the residual sum of the gradients (dout + the
    branch's) are elementwise, so bitwise.  A port that drops the identity path of the backward
    sum fails, first at the gradient reaching block 0 (the last block's h)."""
    fixtures, _ = block_fixtures
    port = load_port()
    iso = tmp_path / "iso"
    assert port.main(["--isolate", str(fixtures), str(iso)]) == 0
    rows = _rows(iso, fixtures)
    for case in ("blocks.float32", "blocks.float64"):
        for name in ("forward.blocks.0.output", "forward.blocks.1.output",
                     "backward.blocks.grad_input"):
            assert rows[(case, name)]["tier"] == "bitwise", (case, name)
    capsys.readouterr()
    original = port.block_backward

    def no_identity_path(dout, *args):
        dh, grads = original(dout, *args)
        return dh - dout, grads
    monkeypatch.setattr(port, "block_backward", no_identity_path)
    broken = tmp_path / "broken"
    assert port.main([str(fixtures), str(broken)]) == 0
    rc, out, _ = check(capsys, broken, fixtures)
    assert rc == 1 and "your port first fails at blocks.float32/backward.blocks.0.grad_output" in out


def test_the_issue_examples_export_and_pass_through_the_port(tmp_path, capsys):
    """spiral_bf16 (bf16, AdamW, reg), circles_fp16_scaler (fp16, Adam, a scale that overflows)
    and train_step (AdamW, warm-up + cosine, clipping, 2 micro-batches), cut to 12 steps: the
    port's Adam/AdamW and every new record pass check-port."""
    cases = cases_for(["spiral_bf16", "circles_fp16_scaler", "train_step"], None, "float32", 12)
    fixtures, port_out = export_and_port(tmp_path, cases)
    rc, out, err = check(capsys, port_out, fixtures)
    assert rc == 0 and "first fails" not in out, out + err
    rows = _rows(port_out, fixtures)
    assert rows[("circles_fp16_scaler.float32", "train.skipped")]["tier"] == "bitwise"
    assert rows[("train_step.float32", "train.lr")]["tier"] == "bitwise"
    skipped = _tensors(fixtures, "circles_fp16_scaler.float32")["train.skipped"].tolist()
    assert skipped[0] and not skipped[-1]


@pytest.mark.parametrize("extra, named", [({"dropout": 0.1}, "dropout"),
                                          ({"norm": "layernorm"}, "norm layernorm"),
                                          ({"norm": "batchnorm"}, "norm batchnorm")])
def test_export_refuses_autocast_with_what_the_fixture_cannot_carry(tmp_path, capsys, extra, named):
    """autocast runs with dropout and both norms in verify/train, but the fixture and the NumPy
    port do not carry their low-precision masks or mixed-kernel norms: one line naming both."""
    path = tmp_path / "s.json"
    path.write_text(json.dumps({**BF16, **extra}))
    code = cli.main(["export", "--spec", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and err.strip().count("\n") == 0, err
    assert f"autocast: export does not carry autocast with {named}" in err, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# autocast with a GradScaler whose first scale overflows, 2 micro-batches a step (seeded S / 2)
# and clipping after the unscale; bf16 with 3 micro-batches and the inf norm
AUTOCAST_STEPS = {
    "fp16_clip_acc": {**FP16, "n_samples": 40, "batch_size": 10, "accumulate": 2,
                      "clip_grad_norm": {"max_norm": 0.05},
                      "grad_scaler": {"init_scale": 2.0 ** 24, "growth_interval": 3,
                                      "growth_factor": 1.5}},
    "bf16_clip_acc3": {**BF16, "n_samples": 60, "batch_size": 10, "accumulate": 3,
                       "clip_grad_norm": {"max_norm": 0.2, "norm_type": "inf"}},
}


def test_autocast_with_accumulation_and_clipping_passes_check_port(tmp_path, capsys):
    """The NumPy port's autocast step over k micro-batches: seeds S / k, the float32 sums
    unscaled, then clipped (inf/NaN total norms on the skipped steps), the optimizer given
    what refnet's manual side gives it; check-port passes every tensor, the skips bitwise."""
    cases = []
    for name, spec in AUTOCAST_STEPS.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**spec, "name": name}))
        cases += cases_for(None, str(path), None)
    fixtures, port_out = export_and_port(tmp_path, cases)
    rc, out, err = check(capsys, port_out, fixtures)
    assert rc == 0 and "first fails" not in out, out + err
    skipped = _tensors(fixtures, "fp16_clip_acc.float32")["train.skipped"]
    assert skipped[0] and not skipped.all()          # the first scale overflows, later steps run
    assert torch.equal(_tensors(port_out, "fp16_clip_acc.float32")["train.skipped"], skipped)
    coef = _tensors(fixtures, "fp16_clip_acc.float32")["train.clip.coef"]
    assert (coef[~skipped] < 1).any()                # clipping active on a step that ran
