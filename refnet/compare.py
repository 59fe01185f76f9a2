"""Graded comparison of two tensors or two loss curves.

Every comparison yields exactly one tier of TIERS, best first (bitwise, ulp, tolerance, fail);
what each means, with the ULP_LIMIT and TOLERANCES values: docs/verification.md.

The result types live here with the comparison: `Verdict` (one comparison) and `Check` (a named
group of verdicts from one oracle); `count_tiers` tallies tiers for a summary.
"""
from dataclasses import asdict, dataclass, field
import math

import torch

TIERS = ("bitwise", "ulp", "tolerance", "fail")

# (rtol, atol) by dtype, for each kind of quantity compared.  bfloat16 / float16 (mixed precision:
# tensors kept in the low dtype, e.g. a port's activations on a bf16 chip) are graded in their own
# format: forward at torch.testing's defaults for the dtype (about 4 and 1 units of eps: 2⁻⁷ and
# 2⁻¹⁰), gradients and curves at twice that.
TOLERANCES = {
    torch.float32: {"forward": (1e-5, 1e-6), "grad": (1e-4, 1e-6), "curve": (1e-4, 1e-6)},
    torch.float64: {"forward": (1e-10, 1e-12), "grad": (1e-9, 1e-12), "curve": (1e-9, 1e-12)},
    torch.bfloat16: {"forward": (1.6e-2, 1e-5), "grad": (3.2e-2, 1e-5), "curve": (3.2e-2, 1e-5)},
    torch.float16: {"forward": (1e-3, 1e-5), "grad": (2e-3, 1e-5), "curve": (2e-3, 1e-5)},
}
# ulps in the tensor's own format: a bfloat16 ulp is 2⁻⁷ relative, so fewer of them are allowed.
ULP_LIMIT = {torch.float32: 8, torch.float64: 8, torch.bfloat16: 2, torch.float16: 4}

_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64,
             torch.float16: torch.int16, torch.bfloat16: torch.int16}


def tolerance(dtype, kind="grad"):
    try:
        return TOLERANCES[dtype][kind]
    except KeyError:
        names = ", ".join(str(d).replace("torch.", "") for d in TOLERANCES)
        raise ValueError(f"dtype: no tolerance for {dtype} / {kind!r}; expected one of {names} "
                         f"and one of {sorted(TOLERANCES[torch.float64])}") from None


def _ordered(t):
    """Map float bits to integers that are monotone in the float's value (−0 and +0 both → 0)."""
    bits = t.contiguous().view(_INT_VIEW[t.dtype]).to(torch.int64)
    width = torch.iinfo(_INT_VIEW[t.dtype]).bits
    sign_min = -(1 << (width - 1))
    return torch.where(bits < 0, sign_min - bits, bits)


def same_bits(a, b):
    """Elementwise: identical bits, or NaN on both sides (counted as agreement).  Same shape/dtype."""
    iv = _INT_VIEW[b.dtype]
    return (a.contiguous().view(iv) == b.contiguous().view(iv)) | (torch.isnan(a) & torch.isnan(b))


def ulp_distance(a, b):
    """Elementwise distance in units in the last place, as float64.

    Counts the representable values between a and b (so across zero it is the sum of both sides,
    −0 vs +0 is 0, and a subnormal step counts 1).  NaN at both positions → 0; NaN at one → inf;
    an infinity against anything but the same infinity → inf.
    """
    if a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(f"ulp_distance: expected equal dtype and shape, got {a.dtype}{list(a.shape)} "
                         f"and {b.dtype}{list(b.shape)}")
    oa, ob = _ordered(a), _ordered(b)
    same_sign = (oa >= 0) == (ob >= 0)
    dist = torch.where(same_sign, (oa - ob).abs().double(), oa.abs().double() + ob.abs().double())
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    inf_mismatch = (torch.isinf(a) | torch.isinf(b)) & (a != b) & ~nan_a & ~nan_b
    dist = torch.where(nan_a & nan_b, 0.0, dist)
    dist = torch.where(nan_a ^ nan_b, math.inf, dist)
    return torch.where(inf_mismatch, math.inf, dist)


@dataclass
class Verdict:
    """One comparison.  `a` is the manual side (or the port), `b` the reference."""
    name: str
    tier: str
    passed: bool
    shape: list = field(default_factory=list)
    dtype: str = ""
    device: str = ""
    numel: int = 0
    mismatched: int = 0
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    max_ulp: float = 0.0
    worst_index: list | None = None
    worst_values: list | None = None
    rtol: float | None = None
    atol: float | None = None
    ulp_limit: int | None = None
    nan_positions: int = 0
    steps: int | None = None
    identical_steps: int | None = None
    first_divergence: int | None = None
    divergence_values: list | None = None
    note: str = ""

    def __bool__(self):
        # true only when it passed: `assert refnet.compare(a, b)` cannot pass silently
        return self.passed

    def to_dict(self):
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in asdict(self).items()}

    def message(self):
        """A failure report: what, where, how far, and both values at the worst point."""
        parts = [f"{self.name}: tier {self.tier}", f"shape {self.shape} {self.dtype} on {self.device}"]
        if self.numel:
            parts.append(f"{self.mismatched}/{self.numel} elements differ")
            parts.append(f"max abs diff {self.max_abs_diff:.3g}, max rel diff {self.max_rel_diff:.3g}, "
                         f"max ulp {self.max_ulp:.6g}")
        if self.worst_index is not None:
            parts.append(f"worst at {self.worst_index}: {self.worst_values[0]!r} vs "
                         f"{self.worst_values[1]!r}")
        if self.steps is not None:
            parts.append(f"{self.identical_steps}/{self.steps} steps identical")
            if self.first_divergence is not None:
                parts.append(f"first parted at step {self.first_divergence}: "
                             f"{self.divergence_values[0]!r} vs {self.divergence_values[1]!r}")
        if self.rtol is not None:
            parts.append(f"rtol {self.rtol:g}, atol {self.atol:g}, ulp limit {self.ulp_limit}")
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)


def unravel(flat_index, shape):
    """The multi-index of a C-order flat index in `shape` (a list)."""
    idx = []
    for dim in reversed(shape):
        idx.append(flat_index % dim)
        flat_index //= dim
    return list(reversed(idx))


def compare_tensors(name, a, b, kind="grad", *, strict_bits=False, ulp_limit=None, rtol=None,
                    atol=None, required=None):
    """Compare a against b and grade it.  Shapes and dtypes must match exactly.

    passed: tier is at least `required` ("bitwise" when strict_bits, else "tolerance").
    """
    required = required or ("bitwise" if strict_bits else "tolerance")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{name}: expected two tensors, got {type(a).__name__} and {type(b).__name__}")
    base = dict(name=name, shape=list(b.shape), dtype=str(b.dtype).replace("torch.", ""),
                device=str(b.device))
    if a.shape != b.shape or a.dtype != b.dtype:
        return Verdict(tier="fail", passed=False, note=(
            f"shape/dtype mismatch: {list(a.shape)} {a.dtype} vs {list(b.shape)} {b.dtype} "
            f"(never broadcast)"), **base)
    if not a.is_floating_point():
        equal = torch.equal(a.cpu(), b.cpu())
        return Verdict(tier="bitwise" if equal else "fail", passed=equal, numel=b.numel(),
                       mismatched=int((a.cpu() != b.cpu()).sum()), **base)
    a_c, b_c = a.detach().cpu(), b.detach().cpu()
    rtol_d, atol_d = tolerance(b.dtype, kind)
    rtol = rtol_d if rtol is None else rtol
    atol = atol_d if atol is None else atol
    ulp_limit = ULP_LIMIT[b.dtype] if ulp_limit is None else ulp_limit
    base.update(rtol=rtol, atol=atol, ulp_limit=ulp_limit, numel=b.numel())

    both_nan = torch.isnan(a_c) & torch.isnan(b_c)
    bits_equal = same_bits(a_c, b_c)
    ulps = ulp_distance(a_c, b_c)
    ad, bd = a_c.double(), b_c.double()
    abs_diff = torch.where(both_nan | (ad == bd), 0.0, (ad - bd).abs())
    abs_diff = torch.where(torch.isnan(abs_diff), math.inf, abs_diff)
    rel_diff = abs_diff / bd.abs().clamp_min(torch.finfo(torch.float64).tiny)
    rel_diff = torch.where(abs_diff == 0, 0.0, rel_diff)
    within_tol = (abs_diff <= atol + rtol * bd.abs()) | both_nan | (ad == bd)
    mismatched = int((~bits_equal).sum())
    if mismatched == 0:
        tier = "bitwise"
    elif float(ulps.max()) <= ulp_limit:
        tier = "ulp"
    elif bool(within_tol.all()):
        tier = "tolerance"
    else:
        tier = "fail"
    verdict = Verdict(tier=tier, passed=meets(tier, required),
                      mismatched=mismatched, nan_positions=int(both_nan.sum()), **base)
    if b.numel():
        verdict.max_abs_diff = float(abs_diff.max())
        verdict.max_rel_diff = float(rel_diff.max())
        verdict.max_ulp = float(ulps.max())
        if mismatched:
            # worst = largest ulp distance (ties: largest abs diff)
            score = ulps.flatten() * 1e30 + abs_diff.flatten() if verdict.max_ulp < math.inf \
                else torch.where(torch.isinf(ulps.flatten()), math.inf, abs_diff.flatten())
            flat = int(torch.argmax(torch.nan_to_num(score, posinf=1e308)))
            verdict.worst_index = unravel(flat, list(b.shape))
            verdict.worst_values = [a_c.flatten()[flat].item(), b_c.flatten()[flat].item()]
    notes = []
    if verdict.nan_positions:
        notes.append(f"{verdict.nan_positions} NaN at the same positions on both sides (counted as "
                     f"agreement)")
    if mismatched:
        only_a = int((torch.isnan(a_c) & ~both_nan).sum())
        only_b = int((torch.isnan(b_c) & ~both_nan).sum())
        if only_a or only_b:
            notes.insert(0, f"NaN on one side only: {only_a} in actual, {only_b} in expected")
    verdict.note = "; ".join(notes)
    return verdict


def compare_curves(name, a, b, *, strict_bits=False, required=None, rtol=None, atol=None,
                   nan_propagation=False):
    """Compare two 1-D loss curves: tier over all steps, identical steps, first step they part.

    A NaN step is never identical, and a curve with NaN (a run that diverged) fails, unless
    nan_propagation=True: a check *about* NaN propagation, where NaN at the same steps on both
    sides is agreement; its verdict then says so (`nan_positions` and the note)."""
    a = torch.as_tensor(a)
    b = torch.as_tensor(b)
    verdict = compare_tensors(name, a, b, kind="curve", strict_bits=strict_bits, required=required,
                              rtol=rtol, atol=atol)
    if a.shape == b.shape and a.dim() == 1 and a.dtype == b.dtype:
        a_c, b_c = a.cpu(), b.cpu()
        same = same_bits(a_c, b_c)
        nan_steps = torch.isnan(a_c) | torch.isnan(b_c)
        if not nan_propagation:
            same = same & ~nan_steps
            if bool(nan_steps.any()):
                verdict.tier, verdict.passed = "fail", False
                verdict.note = (f"{int(nan_steps.sum())} NaN steps (first at step "
                                f"{int(nan_steps.nonzero()[0, 0])}): the run diverged; NaN is "
                                f"never counted as identical in a loss curve")
        elif verdict.nan_positions:
            verdict.note = (f"NaN propagation check: {verdict.nan_positions} NaN steps at the same "
                            f"positions on both sides counted as agreement")
        verdict.steps = int(b.numel())
        verdict.identical_steps = int(same.sum())
        parted = (~same).nonzero()
        if parted.numel():
            step = int(parted[0, 0])
            verdict.first_divergence = step
            verdict.divergence_values = [a_c[step].item(), b_c[step].item()]
    return verdict


AUTO = "auto"
CLAIM = "measured claim"
CLAIM_TIERS = ("holds", "does not hold")
ALLOW_TIERS = ("ulp", "tolerance")


@dataclass
class Check:
    """One named check of an example: the verdicts of every tensor it compared.

    expected: the tier the check promises (docs/verification.md, "The expected-tier rule").
    "auto": resolved by `enforce_expected` (bitwise on CPU, tolerance on CUDA for a
    manual-vs-autograd check; no tier promise for other oracles, whose verdicts carry their own
    bound); None: no tier promised (the verdicts' own bound still applies); a tier name: falling
    short of it fails the check.  A measured claim (oracle CLAIM) has tier "holds" or
    "does not hold" and its figures, never a numerical tier.
    """
    name: str
    verdicts: list
    oracle: str = "manual vs autograd"   # which two things were compared
    note: str = ""
    expected: str | None = AUTO
    figures: dict | None = None          # a measured claim's numbers

    @property
    def kind(self):
        return "claim" if self.oracle == CLAIM else "comparison"

    @property
    def tier(self):
        if self.kind == "claim":
            return CLAIM_TIERS[0] if self.verdicts and all(v.passed for v in self.verdicts) \
                else CLAIM_TIERS[1]
        return max((v.tier for v in self.verdicts), key=TIERS.index, default="fail")

    def short_of_expected(self):
        """True when the tier reached is worse than the expected tier."""
        if self.kind == "claim" or self.expected in (None, AUTO):
            return False
        return not meets(self.tier, self.expected)

    @property
    def passed(self):
        return bool(self.verdicts) and all(v.passed for v in self.verdicts) \
            and not self.short_of_expected()

    def failures(self):
        out = [v.message() for v in self.verdicts if not v.passed]
        if self.short_of_expected():
            worst = max(self.verdicts, key=lambda v: TIERS.index(v.tier))
            out.append(f"{self.name}: tier {self.tier} falls short of the expected tier "
                       f"{self.expected} (worst: {worst.message()})")
        return out


def enforce_expected(checks, device, allow_tier=None, strict_bits=False):
    """Resolve each check's expected tier in place (and return the checks).

    A manual-vs-autograd check left at "auto" expects bitwise on CPU and tolerance on CUDA; a
    check that states its own tier (an op of refnet.not_bitwise's table) keeps it, never stricter
    than the device's.  allow_tier ("ulp" or "tolerance") relaxes every expectation to at worst
    that tier; strict_bits demands bitwise of every manual-vs-autograd check.
    """
    if allow_tier is not None and allow_tier not in ALLOW_TIERS:
        raise ValueError(f"allow_tier: expected one of {', '.join(ALLOW_TIERS)}, got {allow_tier!r}")
    default = "tolerance" if str(device).startswith("cuda") else "bitwise"
    for c in checks:
        if c.kind == "claim":
            c.expected = None
            continue
        if c.expected == AUTO:
            if c.oracle != "manual vs autograd":
                c.expected = None
                continue
            c.expected = default
        elif c.expected is not None:
            c.expected = max(c.expected, default, key=TIERS.index)
        if c.oracle == "manual vs autograd" and strict_bits:
            c.expected = "bitwise"
        elif c.expected is not None and allow_tier is not None:
            c.expected = max(c.expected, allow_tier, key=TIERS.index)
    return checks


def count_tiers(tiers):
    """{tier: count} over an iterable of tier names, in the order they first occur (the summary
    line of `refnet verify` and `refnet check-port`)."""
    counts = {}
    for tier in tiers:
        counts[tier] = counts.get(tier, 0) + 1
    return counts


def meets(tier, required):
    """True when `tier` is `required` or better (TIERS order: bitwise best, fail worst)."""
    return TIERS.index(tier) <= TIERS.index(required)
