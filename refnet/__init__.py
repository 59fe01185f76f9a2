"""refnet — a manual-backprop MLP beside its autograd twin, verified example by example; and the
same grading for anyone's hand-written backward.

Check your own code (docs/check-api.md):

    import torch, refnet

    def affine_forward(x, w, b):
        return x @ w + b, (x, w)

    def affine_backward(dout, cache):
        x, w = cache
        return dout @ w.T, x.T @ dout, dout.sum(0)

    x, w, b = torch.randn(4, 5), torch.randn(5, 3), torch.randn(3)
    report = refnet.check_backward(affine_forward, [x, w, b], affine_backward, tier="ulp")
    print(report)            # one verdict per gradient: dx, dw, db
    report.assert_ok()       # AssertionError naming the tensor, the worst index, the ulps

    refnet.assert_same(dx, x_ref.grad, tier="ulp", name="dx")     # one tensor
    refnet.trace_compare({"dlogits": dlogits, ...}, {"dlogits": logits.grad, ...})  # a chain

Build on refnet's own MLP:

    spec = refnet.Spec.from_dict({"sizes": [2, 8, 1], "activation": "tanh", "data": "xor"})
    pair = refnet.build_pair(spec)               # manual MLP + autograd twin, same parameters
    x, target = refnet.load_data(spec)
    verdicts = refnet.gradient_checks(pair, x, target)        # loss, output, every gradient
    verdicts, curves = refnet.curve_checks(refnet.build_pair(spec), x, target, steps=100)
    summary = refnet.run_training(spec)          # lockstep training with checkpoints (refnet.train)
    refnet.check_training(spec)                  # identical / rounds differently / wrong gradient

Tiers, best first: bitwise, ulp (<= 8 units in the last place), tolerance (rtol/atol by dtype),
fail.  Shapes, dtypes and devices must match exactly; refnet never broadcasts.
"""
import os

# Deterministic cuBLAS needs this before the process's first CUDA matmul, which may come before
# any refnet.settings.determinism() (refnet/settings.py says why); a user's value is kept.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from refnet.api import DEFAULT_TIER, Report, Trace, assert_same, compare, describe, trace_compare
from refnet.backward_check import check_backward
from refnet.compare import (TIERS, Verdict, compare_curves, compare_tensors, render, required_tier,
                            ulp_distance)
from refnet.data import load_data
from refnet.harness import (Pair, build_pair, curve_checks, gradient_checks, spec_checks,
                            train_lockstep)
from refnet.spec import Spec
from refnet.train import train as run_training
from refnet.training_check import TrainingCheck, check_training
from refnet.twin import Twin, grads_of, params_of

__version__ = "0.1.0"

__all__ = [
    # checks for anyone's code
    "compare", "assert_same", "check_backward", "trace_compare", "check_training", "describe",
    "Verdict", "Report", "Trace", "TrainingCheck", "TIERS", "DEFAULT_TIER", "ulp_distance",
    "compare_tensors", "compare_curves", "render", "required_tier",
    # refnet's own MLP
    "Spec", "Pair", "build_pair", "load_data", "gradient_checks", "curve_checks",
    "train_lockstep", "spec_checks", "run_training", "Twin", "grads_of", "params_of",
]
