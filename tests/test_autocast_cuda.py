"""Autocast on CUDA (issue 23): CUDA's rules where they differ from the CPU's, graded at the
tolerance tier with L's bounds.  The rule tables and the grading are checked here on any machine;
the runs on a GPU skip cleanly without one (scripts/cuda_check.sh runs them on a CUDA machine)."""
import pytest
import torch

from manual import autocast as ac
from refnet import cli, harness, not_bitwise, train as train_mod
from refnet.compare import TOLERANCES
from refnet.examples.mixed_precision import activation_grid_spec, circles_fp16_spec, spiral_bf16_spec
from refnet.spec import Spec

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_cuda_activation_rules_are_float32_inside_for_every_activation():
    """CUDA's elementwise backward kernels compute in float and round once, float16 sigmoid too
    (the CPU's float16 sigmoid rounds after every op)."""
    assert set(ac.autocast_rules("cuda")) == set(ac.autocast_rules("cpu")) == set(ac.AUTOCAST_BACKWARD)
    y = torch.rand(4099, dtype=torch.float32).to(torch.float16)
    dout = torch.randn(4099).to(torch.float16)
    cpu = ac.autocast_rules("cpu")["sigmoid"][torch.float16](dout, y)
    cuda_rule = ac.autocast_rules("cuda")["sigmoid"][torch.float16](dout, y)   # evaluated here
    float32_inside = (dout.float() * (1 - y.float()) * y.float()).to(torch.float16)
    assert torch.equal(cuda_rule, float32_inside) and not torch.equal(cpu, cuda_rule)


@pytest.mark.parametrize("spec", [spiral_bf16_spec(device="cuda"), circles_fp16_spec(device="cuda"),
                                  activation_grid_spec("tanh", "bfloat16", "cuda")],
                         ids=["spiral_bf16", "circles_fp16_scaler", "grid"])
def test_cuda_autocast_is_graded_with_the_low_dtypes_bounds(spec):
    assert not_bitwise.expected_tier(spec, "cuda", "grad") == "tolerance"
    assert not_bitwise.expected_tier(spec, "cuda", "training") is None   # compounds: reported
    rtol, atol = TOLERANCES[spec.autocast_dtype]["grad"]
    assert harness.grading_bounds(spec, "grad") == {"rtol": rtol, "atol": atol}
    assert f"autocast:{spec.autocast} not bitwise on CUDA" in not_bitwise.note(spec)
    cpu = spiral_bf16_spec()     # on the CPU: bitwise expected, default bounds, no note
    assert not_bitwise.expected_tier(cpu, "cpu", "training") == "bitwise"
    assert harness.grading_bounds(cpu, "grad") == {} and "autocast" not in not_bitwise.note(cpu)


@pytest.mark.cuda
@CUDA
def test_mixed_precision_examples_on_cuda(capsys):
    code = cli.main(["verify", "--device", "cuda", "--dtype", "float32", "--example",
                     "spiral_bf16", "circles_fp16_scaler", "autocast_activations"])
    out = capsys.readouterr().out
    print(out)
    assert code == 0, out


@pytest.mark.cuda
@CUDA
def test_train_fp16_with_scaler_on_cuda(tmp_path):
    """`train` grades a CUDA autocast run with the low dtype's bounds (harness.grading_bounds):
    it completes (the scaler's skips the same on both sides), its tier reported."""
    spec = circles_fp16_spec(device="cuda")
    summary = train_mod.train(Spec(**{**spec.to_dict(), "steps": 12}), tmp_path / "run",
                              check_every=4)
    print(summary["tier"], summary["grad_scaler"])
    assert summary["status"] == "completed", summary["message"]
    assert summary["grad_scaler"]["same_skips_both_sides"]
