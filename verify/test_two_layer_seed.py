"""Section 6: the document's two-layer program — manual, autograd twin and the numpy original."""
import torch

from refnet.examples.seed import STEPS
from verify._examples import run


def test_two_layer_seed(device, dtype, refnet_check):
    checks = run("two_layer_seed", device, dtype)
    for check in checks.values():
        refnet_check.record(check.verdicts)
    curve = checks[f"loss_curve[{STEPS}]"]
    if device == "cpu":
        # bit for bit: gradients at init, all 2000 losses, the final weights
        for name in ("grad@init", f"loss_curve[{STEPS}]", "final_params"):
            assert checks[name].tier == "bitwise", "\n".join(v.message() for v in checks[name].verdicts)
        assert curve.verdicts[0].identical_steps == STEPS
    else:
        # CUDA: cuBLAS and the elementwise kernels round differently; a documented tolerance
        for check in checks.values():
            assert check.passed, "\n".join(check.failures())
    if dtype == torch.float64:
        oracle = checks["numpy_oracle"]
        assert oracle.passed, "\n".join(oracle.failures())
        assert oracle.verdicts[0].steps == STEPS
