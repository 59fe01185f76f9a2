"""Operations whose manual backward is known NOT to be bit-identical to autograd, with the measured
bound and the reason.  A spec that uses one expects the `tolerance` tier (or better) on its
manual-vs-autograd checks instead of `bitwise`, and its report note says why.  Everything else is
expected bitwise on CPU.  Keys: "activation:NAME", "loss:NAME", "optimizer:NAME".

`ulp` is the largest distance measured for the op alone (manual vs aten backward, 5 × 20 000
random elements, float32 and float64, torch 2.13.0 CPU).  Through a network the distance grows:
gradients at init are expected within the tolerance tier; through training the rounding
differences compound (with a large learning rate, chaotically), so the loss curve after step 0 and
the final parameters have no bound: they are graded and reported, not expected.  Step 0's loss is
a forward value and stays bitwise.
"""

KNOWN_NOT_BITWISE = {
    "activation:elu": {
        "ulp": 2,
        "reason": "elu_backward's kernel evaluates exp with Sleef in vector lanes (std::exp in the "
                  "tail); torch.exp, the only exp manual/ may call, uses another implementation, "
                  "so about 3-4% of elements differ by 1-2 ulp",
    },
}


def spec_keys(spec):
    """The table keys a spec touches."""
    keys = {f"activation:{a}" for a in spec.activations}
    keys.add(f"loss:{spec.loss}")
    keys.add(f"optimizer:{spec.optimizer['name']}")
    return keys


def known_issues(spec):
    """[(key, entry)] of the table entries a spec uses, in a stable order."""
    return [(k, KNOWN_NOT_BITWISE[k]) for k in sorted(spec_keys(spec)) if k in KNOWN_NOT_BITWISE]


def expected_tier(spec, device="cpu", stage="grad"):
    """The tier manual vs autograd is expected to reach, or None when there is no bound.

    stage "grad": gradients at init; "training": loss curve and final parameters.  Bitwise on CPU
    unless a known op is used (then tolerance for "grad", None for "training"); tolerance on CUDA
    (README.md, "Devices")."""
    if known_issues(spec):
        return "tolerance" if stage == "grad" else None
    return "tolerance" if str(device).startswith("cuda") else "bitwise"


def note(spec):
    """A report note naming the known non-bitwise ops of a spec ("" when there are none)."""
    return "; ".join(f"{k} not bitwise (op alone <= {e['ulp']} ulp): {e['reason']}"
                     for k, e in known_issues(spec))
