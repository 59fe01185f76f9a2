"""Section 6: the document's two-layer numpy program, three ways.

N, D_in, H, D_out = 64, 1000, 100, 10; x, y, w1, w2 ~ randn; h = sigmoid(x·w1); y_pred = h·w2;
loss = Σ(y_pred − y)²; SGD, lr 1e-4, 2000 steps, no biases.
"""
import numpy as np
import torch

from refnet.compare import Check, compare_curves, compare_tensors
from refnet.examples import register
from refnet.fixtures import EXPORT_STEPS, case_for_spec
from refnet.harness import build_pair, curve_checks, gradient_checks
from refnet.oracles import numpy_seed
from refnet.spec import Spec

N, D_IN, H, D_OUT = 64, 1000, 100, 10
STEPS = 2000
LR = 1e-4
SEED = 0
# manual vs the numpy oracle (float64 only): numpy's own GEMMs and exp round differently, and
# 2000 steps amplify that, so the curves agree to a relative tolerance, not to the bit
# (measured on torch 2.13 CPU: max relative gap 5.6e-15 on the loss, 6e-15 absolute on weights).
ORACLE_RTOL = 1e-12
ORACLE_ATOL = 1e-13


def seed_data(seed=SEED):
    """x (N, D_in), y (N, D_out), w1 (D_in, H), w2 (H, D_out), all float64, standard normal."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((N, D_IN), generator=gen, dtype=torch.float64)
    y = torch.randn((N, D_OUT), generator=gen, dtype=torch.float64)
    w1 = torch.randn((D_IN, H), generator=gen, dtype=torch.float64)
    w2 = torch.randn((H, D_OUT), generator=gen, dtype=torch.float64)
    return x, y, w1, w2


def seed_spec(dtype="float64", device="cpu", steps=STEPS):
    return Spec(sizes=[D_IN, H, D_OUT], activation="sigmoid", bias=False, loss="sum_squared",
                optimizer={"name": "sgd", "lr": LR}, steps=steps, data="random", dtype=dtype,
                device=device, seed=SEED, init="randn", name="two_layer_seed")


def seed_params(w1, w2):
    # nn.Linear layout is (out, in): the document's w1 (D_in, H) is layers.0.weight transposed.
    return {"layers.0.weight": w1.t().contiguous(), "layers.1.weight": w2.t().contiguous()}


def example_data(spec):
    """The document's x and y, on the spec's device and dtype (`train --example two_layer_seed`)."""
    x, y, _, _ = seed_data(spec.seed)
    return x.to(spec.torch_dtype).to(spec.device), y.to(spec.torch_dtype).to(spec.device)


def example_params(spec):
    """The document's w1 and w2 in nn.Linear layout."""
    _, _, w1, w2 = seed_data(spec.seed)
    return seed_params(w1, w2)


def export_case(dtype="float64", steps=None):
    """The golden-fixture case (refnet export): the same program, a short training run."""
    steps = EXPORT_STEPS if steps is None else steps
    x, y, w1, w2 = seed_data()
    torch_dtype = torch.float32 if dtype == "float32" else torch.float64
    return case_for_spec(seed_spec(dtype, "cpu", steps), seed_params(w1, w2),
                         (x.to(torch_dtype), y.to(torch_dtype)),
                         note=f"training run cut to {steps} of the example's {STEPS} steps to keep "
                              f"the fixture small")


@register("two_layer_seed", "The document's two-layer numpy program, 2000 SGD steps", "6",
          case=export_case, spec=seed_spec, data=example_data, params=example_params)
def run(ctx, steps=STEPS):
    spec = seed_spec(ctx.dtype_name, ctx.device, steps)
    x, y, w1, w2 = seed_data()
    xd, yd = x.to(ctx.dtype).to(ctx.device), y.to(ctx.dtype).to(ctx.device)
    checks = [Check("grad@init", gradient_checks(build_pair(spec, seed_params(w1, w2)), xd, yd,
                                                  ctx.strict_bits))]
    pair = build_pair(spec, seed_params(w1, w2))
    verdicts, (losses_m, _) = curve_checks(pair, xd, yd, steps, strict_bits=ctx.strict_bits)
    checks.append(Check(f"loss_curve[{steps}]", verdicts[:1]))
    checks.append(Check("final_params", verdicts[1:]))
    if ctx.dtype == torch.float64:
        losses_np, w1_np, w2_np = numpy_seed.train(x.numpy(), y.numpy(), w1.numpy(), w2.numpy(),
                                                   steps, LR)
        oracle = [compare_curves("loss_curve", losses_m.cpu(), torch.from_numpy(losses_np),
                                 rtol=ORACLE_RTOL, atol=0.0)]
        for name, w_np in (("layers.0.weight", w1_np), ("layers.1.weight", w2_np)):
            oracle.append(compare_tensors(f"final.{name}", pair.mlp.params[name].cpu(),
                                          torch.from_numpy(np.ascontiguousarray(w_np.T)), "curve",
                                          rtol=ORACLE_RTOL, atol=ORACLE_ATOL))
        checks.append(Check("numpy_oracle", oracle, oracle="manual vs document's numpy program"))
    return checks
