"""The table of operations whose manual backward is NOT bit-identical to autograd, with the measured
bound and the reason.  A spec that uses one expects the `tolerance` tier (or better) on its
manual-vs-autograd checks instead of `bitwise`, and its report note says why.  Everything else is
expected bitwise on CPU.  Keys: "activation:NAME", "loss:NAME", "optimizer:NAME".

`ulp` is the largest distance measured for the op alone (manual vs aten backward, 5 × 20 000
random elements, float32 and float64, torch 2.13.0 CPU).  Through a network the distance grows:
gradients at init are expected within the tolerance tier; through training the rounding
differences compound (with a large learning rate, chaotically), so the loss curve after step 0 and
the final parameters have no bound: they are graded and reported, not expected.  Step 0's loss is
a forward value and stays bitwise.  `expected_tier` is the one rule for the tier a spec must reach.
The table as a page, and the rule: docs/bit-exactness.md, docs/verification.md ("The expected-tier
rule").
"""
import torch

KNOWN_NOT_BITWISE = {
    "activation:elu": {
        "ulp": 1,
        "reason": "elu_backward's kernel evaluates exp with Sleef in vector lanes and glibc "
                  "std::exp in the scalar tail of each chunk; manual.kernel_exp reproduces Sleef "
                  "(bitwise in the lanes) but glibc's exp is not reachable by plain ops, so tail "
                  "elements use torch.exp / float64 exp: <= 1 ulp on ~0.5% (float64) / ~0.07% "
                  "(float32) of tail values; 2 of 150 random ELU specs were not bitwise",
    },
    "loss:cross_entropy": {
        "ulp": 512,
        "bitwise_on": ("AVX2", "AVX512"),
        "reason": "with ATEN_CPU_CAPABILITY=default the log_softmax backward kernel uses std::exp "
                  "instead of Sleef and manual falls back to torch.exp: up to 2 ulp (float64) and "
                  "512 ulp (float32, where -1/N + p/N cancels) on the target element",
    },
}


def applies(key):
    """True when table entry `key` (e.g. "loss:cross_entropy") is not bitwise on this machine: the
    entry exists and this CPU's kernels (ATEN_CPU_CAPABILITY) are not among its `bitwise_on`."""
    entry = KNOWN_NOT_BITWISE.get(key)
    return entry is not None and \
        torch.backends.cpu.get_cpu_capability() not in entry.get("bitwise_on", ())


def spec_keys(spec):
    """The table keys a spec touches."""
    keys = {f"activation:{a}" for a in spec.activations}
    keys.add(f"loss:{spec.loss}")
    keys.add(f"optimizer:{spec.optimizer['name']}")
    return keys


def known_issues(spec):
    """[(key, entry)] of the table entries a spec uses, in a stable order."""
    return [(k, KNOWN_NOT_BITWISE[k]) for k in sorted(spec_keys(spec)) if applies(k)]


def expected_tier(spec, device="cpu", stage="grad"):
    """The tier manual vs autograd is expected to reach, or None when there is no bound.

    stage "grad": gradients at init; "training": loss curve and final parameters.  Bitwise on CPU
    unless a known op is used (then tolerance for "grad", None for "training"); tolerance on CUDA
    (docs/verification.md, "The expected-tier rule")."""
    if known_issues(spec):
        return "tolerance" if stage == "grad" else None
    return "tolerance" if str(device).startswith("cuda") else "bitwise"


def expected_for(keys, device="cpu", stage="grad"):
    """The expected tier of a check that uses the ops `keys` ("activation:elu", ...).

    stage "op": the op alone (its stated ulp bound: "ulp" when within compare.ULP_LIMIT, else
    "tolerance"); "grad": gradients through a network ("tolerance"); "training": None (no bound).
    Without a table entry: bitwise on CPU, tolerance on CUDA."""
    cuda = str(device).startswith("cuda")
    hits = [KNOWN_NOT_BITWISE[k] for k in sorted(keys) if applies(k)]
    if not hits:
        return "tolerance" if cuda else "bitwise"
    if stage == "training":
        return None
    if stage == "op" and not cuda and max(e["ulp"] for e in hits) <= 8:  # compare.ULP_LIMIT
        return "ulp"
    return "tolerance"


def note(spec):
    """A report note naming the known non-bitwise ops of a spec ("" when there are none)."""
    return "; ".join(f"{k} not bitwise (op alone <= {e['ulp']} ulp): {e['reason']}"
                     for k, e in known_issues(spec))
