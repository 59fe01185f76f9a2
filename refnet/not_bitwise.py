"""The table of operations whose manual backward is NOT bit-identical to autograd, with the measured
bound and the reason.  A spec that uses one expects the `tolerance` tier (or better) on its
manual-vs-autograd checks instead of `bitwise`, and its report note says why.  Everything else is
expected bitwise on CPU.  Keys: "activation:NAME", "loss:NAME", "optimizer:NAME", "norm:NAME",
"embedding".  CUDA has its
own table, CUDA_NOT_BITWISE (below): the tier and the note follow the device a spec runs on.

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

from refnet.compare import TOLERANCES, ULP_LIMIT

KNOWN_NOT_BITWISE = {
    "activation:elu": {
        "ulp": 1,
        "reason": "elu_backward's kernel evaluates exp with Sleef in vector lanes and glibc "
                  "std::exp in the scalar tail of each chunk; manual.kernel_exp reproduces Sleef; "
                  "the tail used torch.exp / float64 exp (<= 1 ulp on ~0.5% / ~0.07% of tail "
                  "values, 2 of 150 random ELU specs not bitwise) until manual/libm_tail.py "
                  "(glibc's exp via math.exp, expf mirrored): 0 of 144 150 differ since; the "
                  "entry is kept as a floor until retired",
    },
    "norm:layernorm": {
        "ulp": 26624,
        "bitwise_on": ("AVX2", "AVX512"),
        "reason": "layer_norm_backward_frame sums each row in 256-bit vector lanes (plain body, "
                  "FMA tail, shuffle-tree fold for float32); manual reproduces that order where "
                  "measured (AVX-512 and AVX2) and uses torch.sum elsewhere: there "
                  "dx differs by at most ~1.2e-7 (float32) / 2.5e-16 (float64) times max|dx|, "
                  "the ulp count is on elements near 0 where the terms cancel",
    },
    "loss:cross_entropy": {
        "ulp": 512,
        "bitwise_on": ("AVX2", "AVX512"),
        "reason": "with ATEN_CPU_CAPABILITY=default the log_softmax backward kernel uses std::exp "
                  "instead of Sleef and manual falls back to torch.exp: up to 2 ulp (float64) and "
                  "512 ulp (float32, where -1/N + p/N cancels) on the target element",
    },
}


# On CUDA both sides call the same torch ops, but autograd's backward runs CUDA's fused backward
# kernels where manual composes plain ops (or mirrors the CPU kernels' arithmetic), so any op below
# may differ in its last bits.  Bounds are derived from the kernels' arithmetic (nvcc contracts
# a·b + c into one fma; CUDA reductions sum in a block-tree order, not the CPU's 8-lane cascade),
# not yet measured on a GPU: scripts/cuda_check.sh reports the measured tiers.  u is the unit
# roundoff: 2⁻²⁴ (float32), 2⁻⁵³ (float64).  A CUDA spec is expected at the tolerance tier.
CUDA_NOT_BITWISE = {
    "matmul": {
        "bound": "|Δ| <= K·u·Σ|a·b| per output (K the inner size)",
        "reason": "cuBLAS picks its kernel (tile, split-K) by operand layout, and the backward's "
                  "products (doutᵀ·x, dout·W) are laid out differently by autograd and manual; "
                  "different kernels sum the K products in different orders",
    },
    "activation:tanh": {
        "bound": "|Δ dx| <= u·|dout| + 1 ulp",
        "reason": "CUDA's tanh_backward computes dout·(1 − y²) with 1 − y² as one fused fma; "
                  "manual's addcmul(1, y, y, value=−1) may round y² first (the mirror of the CPU "
                  "kernel): the two differ by at most the rounding of y²",
    },
    "activation:sigmoid": {
        "bound": "|Δ dx| <= 2 ulp",
        "reason": "CUDA's sigmoid_backward evaluates dout·(1 − y)·y in its own association; "
                  "manual follows the CPU kernel's (1 − y), ·dout, ·y",
    },
    "activation:elu": {
        "bound": "|Δ dx| <= 2 ulp",
        "reason": "CUDA's elu_backward uses the device exp/expm1 (<= 1-2 ulp from exact); "
                  "manual.kernel_exp mirrors the CPU's Sleef exp",
    },
    "activation:gelu": {
        "bound": "|Δ dx| <= 4 ulp",
        "reason": "CUDA's gelu_backward uses the device erf and exp (<= 2 ulp each) and nvcc's "
                  "contractions; manual mirrors the CPU kernels' (oneDNN, SLEEF, glibc)",
    },
    "activation:gelu_tanh": {
        "bound": "|Δ dx| <= 4 ulp",
        "reason": "CUDA's gelu_backward uses the device tanh (<= 2 ulp) and nvcc's contractions; "
                  "manual mirrors the CPU kernel's SLEEF and glibc tanh",
    },
    "activation:silu": {
        "bound": "|Δ dx| <= 4 ulp",
        "reason": "CUDA's silu_backward uses the device exp (<= 2 ulp) and nvcc's contractions; "
                  "manual mirrors the CPU kernel's SLEEF and glibc exp",
    },
    "loss:cross_entropy": {
        "bound": "loss: |Δ| <= N·u·|loss|; dlogits: <= 2 ulp + N·u",
        "reason": "nll's mean is a CUDA block reduction (manual mirrors the CPU's 8-partial "
                  "cascade) and log_softmax's forward and backward use the device exp",
    },
    "loss:svm": {
        "bound": "loss: |Δ| <= N·C·u·|loss|",
        "reason": "multi_margin_loss's CUDA kernel sums each row's margins and the batch mean "
                  "in its own order; manual mirrors the CPU kernel's order",
    },
    "loss:mse": {
        "bound": "loss: |Δ| <= N·C·u·|loss|",
        "reason": "mse_loss's CUDA reduction sums in a block-tree order; manual's sum of "
                  "squares follows the CPU order",
    },
    "loss:sum_squared": {
        "bound": "loss: |Δ| <= N·C·u·|loss|",
        "reason": "the twin's reduction on CUDA is a block-tree sum; the order of manual's sum "
                  "need not match",
    },
    "norm:batchnorm": {
        "bound": "dx, dweight, dbias: |Δ| <= N·u·Σₙ|terms| per feature",
        "reason": "cuDNN / the native CUDA batch_norm_backward reduce Σdy and Σ(x − μ)·dy over "
                  "the batch in a block-tree order; manual mirrors the CPU kernel's row-by-row sums",
    },
    "norm:layernorm": {
        "bound": "dx: |Δ| <= D·u·max|dx| per row; dweight, dbias: N·u·Σ|terms|",
        "reason": "CUDA's layer_norm backward reduces each row with warp shuffles (and dweight / "
                  "dbias over rows in tiles); manual mirrors the CPU kernel's 256-bit lane order",
    },
    "embedding": {
        "bound": "dweight: |Δ| <= R·u·Σ|dout rows| for a token repeated R times",
        "reason": "embedding_dense_backward on CUDA sorts the indices and sums each token's rows "
                  "in segments; manual's index_add_ follows the CPU kernel's index order",
    },
}


# Autocast on CUDA (read from aten/src/ATen/autocast_mode.h's lists, not measured: no GPU here):
# the manual step follows the CPU lists and kernels (manual/autocast.py), with CUDA's float32-inside
# activation rule.  What differs is in L's precision, so the bound is L's: the float32 gradients,
# loss and parameters are graded with TOLERANCES[L] (refnet.harness.grading_bounds), gradients at
# init at the tolerance tier, training unbounded (an L rounding difference compounds).
CUDA_NOT_BITWISE.update({
    f"autocast:{name}": {
        "bound": f"|Δ| <= {TOLERANCES[dtype]['grad'][0]:g}·|g| + {TOLERANCES[dtype]['grad'][1]:g} "
                 f"(L's tolerance, TOLERANCES[{name}]['grad'])",
        "reason": "CUDA's autocast lists differ from the CPU's: log_softmax is in the "
                  "fp32-unless-dtype-given list and cross_entropy passes its input's dtype, so "
                  "the cross-entropy's log-softmax runs in L (manual: the float32 loss on the "
                  "cast-up output, as on the CPU); cuBLAS/cuBLASLt run the L GEMMs with float32 "
                  "compute, the bias in the epilogue and reduced-precision split-K reductions; "
                  "the L sums (bias gradients) are block-tree reductions",
    } for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16))})


def applies(key):
    """True when table entry `key` (e.g. "loss:cross_entropy") is not bitwise on this machine: the
    entry exists and this CPU's kernels (ATEN_CPU_CAPABILITY) are not among its `bitwise_on`."""
    entry = KNOWN_NOT_BITWISE.get(key)
    return entry is not None and \
        torch.backends.cpu.get_cpu_capability() not in entry.get("bitwise_on", ())


def _is_cuda(device):
    return str(device).startswith("cuda")


def spec_keys(spec):
    """The table keys a spec touches."""
    keys = {f"activation:{a}" for a in spec.activations}
    keys.add(f"loss:{spec.loss}")
    keys.add(f"optimizer:{spec.optimizer['name']}")
    if spec.norm:
        keys.add(f"norm:{spec.norm}")
    if spec.embedding:
        keys.add("embedding")
    if spec.autocast:
        keys.add(f"autocast:{spec.autocast}")
    if spec.blocks:     # the residual blocks' own activation and layer norm
        keys.add(f"activation:{spec.blocks['activation']}")
        if spec.blocks["norm"] == "layer":
            keys.add("norm:layernorm")
    return keys


def known_issues(spec, device=None):
    """[(key, entry)] of the table entries a spec uses on a device (default: the spec's), in a
    stable order.  CPU: KNOWN_NOT_BITWISE, by the CPU's capability; CUDA: CUDA_NOT_BITWISE (the
    CPU's capability says nothing about CUDA kernels), "matmul" for every spec."""
    device = spec.device if device is None else device
    if _is_cuda(device):
        keys = spec_keys(spec) | {"matmul"}
        return [(k, CUDA_NOT_BITWISE[k]) for k in sorted(keys) if k in CUDA_NOT_BITWISE]
    return [(k, KNOWN_NOT_BITWISE[k]) for k in sorted(spec_keys(spec))
            if applies(k)]


def expected_tier(spec, device="cpu", stage="grad"):
    """The tier manual vs autograd is expected to reach, or None when there is no bound.

    stage "grad": gradients at init; "training": loss curve and final parameters.  CPU: bitwise
    unless a known op is used (then tolerance for "grad", None for "training").  CUDA: tolerance
    (docs/verification.md, "Devices"; CUDA_NOT_BITWISE says which ops and by how much)."""
    return expected_for(spec_keys(spec), device, stage)


def expected_for(keys, device="cpu", stage="grad"):
    """The expected tier of a check that uses the ops `keys` ("activation:elu", ...).

    stage "op": the op alone (its stated ulp bound: "ulp" when within compare.ULP_LIMIT, else
    "tolerance"); "grad": gradients through a network ("tolerance"); "training": None (no bound).
    Without a table entry: bitwise on CPU; on CUDA tolerance always (expected_tier's rule)."""
    if _is_cuda(device):
        autocast = any(k.startswith("autocast:") for k in keys)
        return None if autocast and stage == "training" else "tolerance"
    hits = [KNOWN_NOT_BITWISE[k] for k in sorted(keys) if applies(k)]
    if not hits:
        return "bitwise"
    if stage == "training":
        return None
    if stage == "op" and max(e.get("ulp", 1 << 30) for e in hits) <= max(ULP_LIMIT.values()):
        return "ulp"
    return "tolerance"


def note(spec, device=None):
    """A report note naming the known non-bitwise ops of a spec on a device ("" when none)."""
    device = spec.device if device is None else device
    where = "on CUDA " if _is_cuda(device) else ""
    return "; ".join(f"{k} not bitwise {where}(op alone <= {e['ulp']} ulp): {e['reason']}"
                     if "ulp" in e else
                     f"{k} not bitwise {where}({e['bound']}, derived): {e['reason']}"
                     for k, e in known_issues(spec, device))
