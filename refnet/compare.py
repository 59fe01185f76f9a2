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
GRADED = TIERS[:3]          # the tiers a check may require: bitwise, ulp, tolerance
DEFAULT_TIER = "tolerance"

# The oracles: which two things a Check compared (a row's "oracle" in the JSON report).
ORACLE_AUTOGRAD = "manual vs autograd"
ORACLE_CENTRAL_DIFFERENCES = "manual vs central differences (float64)"   # refnet.oracles.fd
ORACLE_FINITE_DIFFERENCES = "manual vs finite differences (float64)"     # the examples' own
ORACLE_GRADCHECK = "twin (autograd) vs torch.autograd.gradcheck (float64)"
ORACLE_DOCUMENT = "manual vs the document's numbers"
ORACLE_NUMPY_PROGRAM = "manual vs document's numpy program"
ORACLE_STOCK_BATCHNORM = "ninja chain vs F.batch_norm (training mode)"

# (rtol, atol) by dtype, for each kind of quantity compared.  atol is a cap, not a floor: the
# absolute term a comparison uses is min(atol, rtol * max|expected|) (`scaled_atol`), so a tensor
# whose values are all far below atol (a gradient near convergence) is still graded relative to
# its own scale, and an all-zeros or off-by-a-factor answer cannot pass (docs/check-api.md).
# bfloat16 / float16 (mixed precision: tensors kept in the low dtype, e.g. a port's activations
# on a bf16 chip) are graded in their own format: forward at torch.testing's defaults for the
# dtype (about 4 and 1 units of eps: 2⁻⁷ and 2⁻¹⁰), gradients and curves at twice that.
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


def magnitude(t):
    """max |t| over the finite values of a tensor (0 when none); a number as its absolute value."""
    if not isinstance(t, torch.Tensor):
        return abs(float(t))
    t = t.detach()
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def scaled_atol(expected, rtol, atol, scale=None):
    """The absolute term of the tolerance rule: min(atol, rtol * max|expected|) over the finite
    values of `expected` (0 for an all-zero or all-NaN reference: then only equal values pass).
    scale (a number or a tensor) replaces max|expected| when the reference's own size is not the
    size of what it was computed from (a gradient that is mathematically zero: rounding noise)."""
    return min(atol, rtol * magnitude(expected if scale is None else scale))


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
    mismatched: int = 0             # elements whose bits differ
    beyond_tolerance: int | None = None   # elements outside |a - b| <= atol + rtol*|b| (graded)
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

    def message(self, required=None, sides=("actual", "expected")):
        """This verdict on one line (refnet.compare.render)."""
        return render(self, required, sides=sides)


def render(v, required=None, *, block=False, sides=("actual", "expected")):
    """The one renderer of a Verdict: what, where, how far, both values at the worst point, the
    thresholds and the note.  One line ("; "-joined, for tables and logs) or, with block=True,
    a multi-line report for a failing assertion.  sides: the names of `a` and `b`."""
    head = f"{v.name}: tier {v.tier}"
    if block:
        head = f"refnet: {v.name} is {v.tier!r}"
    if required is not None:
        head += f", required {required!r} or better"
    facts = [f"shape {v.shape} {v.dtype} on {v.device}"]
    sampled = v.ulp_limit is None and v.rtol is not None    # finite differences: sampled points
    if v.numel and (v.mismatched or v.worst_index is not None):
        what = "sampled coordinates miss the threshold" if sampled else "elements differ"
        beyond = "" if v.beyond_tolerance is None or sampled else \
            f", {v.beyond_tolerance} beyond tolerance"
        facts.append(f"{v.mismatched} of {v.numel} {what} ({100.0 * v.mismatched / v.numel:.3g}%)"
                     f"{beyond}")
        ulp = "" if math.isnan(v.max_ulp) or sampled else f", max ulp {v.max_ulp:.6g}"
        facts.append(f"max abs diff {v.max_abs_diff:.3g}, max rel diff {v.max_rel_diff:.3g}{ulp}")
    if v.worst_index is not None:
        a, b = v.worst_values
        facts.append(f"worst at index {v.worst_index}: {sides[0]} {a!r} vs {sides[1]} {b!r}")
    if v.steps is not None:
        facts.append(f"{v.identical_steps}/{v.steps} steps identical")
        if v.first_divergence is not None:
            a, b = v.divergence_values
            facts.append(f"first parted at step {v.first_divergence}: {sides[0]} {a!r} vs "
                         f"{sides[1]} {b!r}")
    if v.rtol is not None and sampled:
        facts.append(f"thresholds: rel_error |a - n| / (|a| + |n|) <= {v.rtol:g}, or "
                     f"|a - n| <= {v.atol:g}")
    elif v.rtol is not None:
        facts.append(f"thresholds: ulp <= {v.ulp_limit}; tolerance |{sides[0]} - {sides[1]}| <= "
                     f"{v.atol:g} + {v.rtol:g}*|{sides[1]}|")
    if v.note:
        facts.append(f"note: {v.note}")
    return "\n  ".join([head] + facts) if block else "; ".join([head] + facts)


def unravel(flat_index, shape):
    """The multi-index of a C-order flat index in `shape` (a list)."""
    idx = []
    for dim in reversed(shape):
        idx.append(flat_index % dim)
        flat_index //= dim
    return list(reversed(idx))


def required_tier(tier=None, *, strict_bits=False, arg="tier"):
    """The one spelling of a required tier: `tier` (bitwise, ulp or tolerance; None: the
    default, DEFAULT_TIER), or bitwise when `strict_bits` (the CLI's --strict-bits).  Raises
    ValueError naming `arg` for anything else."""
    if strict_bits:
        return "bitwise"
    if tier is None:
        return DEFAULT_TIER
    if tier not in GRADED:
        raise ValueError(f"{arg}: expected one of {', '.join(GRADED)}, got {tier!r}")
    return tier


def _describe_tensor(t):
    return f"{list(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


MISMATCH = "mismatch: "    # the note of a verdict that failed on shape, dtype or device


def is_mismatch(v):
    """True when a verdict failed on shape, dtype or device, not on values."""
    return v.tier == "fail" and v.note.startswith(MISMATCH)


def _mismatch(name, a, b):
    """A `fail` verdict when a and b differ in shape, dtype or device (never broadcast, cast or
    moved), else None; TypeError for what is not graded at all."""
    for arg, t in (("actual", a), ("expected", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg}: expected a torch.Tensor for {name!r}, got {type(t).__name__}"
                            + (" (convert it with torch.as_tensor first)"
                               if isinstance(t, (int, float, list, tuple)) or hasattr(t, "__array__")
                               else ""))
    what = []
    if a.shape != b.shape:
        what.append(f"shape {list(a.shape)} vs {list(b.shape)}")
    if a.dtype != b.dtype:
        what.append(f"dtype {a.dtype} vs {b.dtype}")
    if a.device != b.device:
        what.append(f"device {a.device} vs {b.device}")
    if what:
        return Verdict(name=name, tier="fail", passed=False, shape=list(b.shape),
                       dtype=str(b.dtype).replace("torch.", ""), device=str(b.device),
                       numel=b.numel(), note=(
                           f"{MISMATCH}{', '.join(what)} (actual vs expected); refnet never "
                           f"broadcasts, casts or moves: make both sides {_describe_tensor(b)} "
                           f"explicitly if that is what you mean"))
    if b.is_complex():
        raise TypeError(f"{name}: complex tensors are not graded; compare .real and .imag")
    if b.is_floating_point() and b.dtype not in TOLERANCES:
        raise TypeError(f"{name}: dtype {b.dtype} is not graded; refnet grades float32, "
                        f"float64, bfloat16 and float16 (integers and bool exactly); cast both "
                        f"sides if you mean it")
    return None


def compare_tensors(name, a, b, kind="grad", *, tier=None, ulp_limit=None, rtol=None, atol=None,
                    scale=None):
    """The one comparator: grade `a` (actual, the manual side) against `b` (expected).

    Strict: shapes, dtypes and devices must be equal (a mismatch is a `fail` that says so, never
    a broadcast, cast or move).  Floating tensors (float32, float64) are graded bitwise / ulp /
    tolerance / fail; integer and bool tensors are equal (bitwise) or fail.
    passed: the tier is `tier` or better (refnet.compare.required_tier; default tolerance).
    The tolerance tier's absolute term is `scaled_atol` (atol given: used as is; scale given: the
    size of what b is computed from, instead of max|b|).
    """
    required = required_tier(tier)
    mismatch = _mismatch(name, a, b)
    if mismatch is not None:
        return mismatch
    base = dict(name=name, shape=list(b.shape), dtype=str(b.dtype).replace("torch.", ""),
                device=str(b.device))
    if not b.is_floating_point():
        equal = torch.equal(a.cpu(), b.cpu())
        return Verdict(tier="bitwise" if equal else "fail", passed=meets("bitwise" if equal else
                                                                         "fail", required),
                       numel=b.numel(), mismatched=int((a.cpu() != b.cpu()).sum()), **base)
    a_c, b_c = a.detach().cpu(), b.detach().cpu()
    rtol_d, atol_d = tolerance(b.dtype, kind)
    rtol = rtol_d if rtol is None else rtol
    atol = scaled_atol(b_c, rtol, atol_d, scale) if atol is None else atol
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
                      mismatched=mismatched, beyond_tolerance=int((~within_tol).sum()),
                      nan_positions=int(both_nan.sum()), **base)
    if b.numel():
        _measure(verdict, a_c, b_c, ulps, abs_diff, rel_diff)
    return verdict


def _measure(verdict, a_c, b_c, ulps, abs_diff, rel_diff):
    """Fill a verdict's distances, its worst point and its NaN notes."""
    verdict.max_abs_diff = float(abs_diff.max())
    verdict.max_rel_diff = float(rel_diff.max())
    verdict.max_ulp = float(ulps.max())
    both_nan = torch.isnan(a_c) & torch.isnan(b_c)
    notes = []
    if verdict.nan_positions:
        notes.append(f"{verdict.nan_positions} NaN at the same positions on both sides (counted as "
                     f"agreement)")
    if verdict.mismatched:
        # worst = largest ulp distance (ties: largest abs diff)
        score = ulps.flatten() * 1e30 + abs_diff.flatten() if verdict.max_ulp < math.inf \
            else torch.where(torch.isinf(ulps.flatten()), math.inf, abs_diff.flatten())
        flat = int(torch.argmax(torch.nan_to_num(score, posinf=1e308)))
        verdict.worst_index = unravel(flat, verdict.shape)
        verdict.worst_values = [a_c.flatten()[flat].item(), b_c.flatten()[flat].item()]
        only_a = int((torch.isnan(a_c) & ~both_nan).sum())
        only_b = int((torch.isnan(b_c) & ~both_nan).sum())
        if only_a or only_b:
            notes.insert(0, f"NaN on one side only: {only_a} in actual, {only_b} in expected")
    verdict.note = "; ".join(notes)


def compare_curves(name, a, b, *, tier=None, rtol=None, atol=None, nan_propagation=False):
    """Compare two 1-D loss curves: tier over all steps, identical steps, first step they part.

    A NaN step is never identical, and a curve with NaN (a run that diverged) fails, unless
    nan_propagation=True: a check *about* NaN propagation, where NaN at the same steps on both
    sides is agreement; its verdict then says so (`nan_positions` and the note)."""
    a = torch.as_tensor(a)
    b = torch.as_tensor(b)
    verdict = compare_tensors(name, a, b, kind="curve", tier=tier, rtol=rtol, atol=atol)
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
CLAIM = "measured claim"                  # the oracle of a measured claim
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
    oracle: str = ORACLE_AUTOGRAD       # which two things were compared (ORACLE_*)
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
            if c.oracle != ORACLE_AUTOGRAD:
                c.expected = None
                continue
            c.expected = default
        elif c.expected is not None:
            c.expected = max(c.expected, default, key=TIERS.index)
        if c.oracle == ORACLE_AUTOGRAD and strict_bits:
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
