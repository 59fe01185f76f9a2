"""refnet's checks for anyone's tensors: grade two tensors, a list of verdicts, or a chain of
intermediates against a reference.  A hand-written backward: refnet/backward_check.py; a training
run of refnet's MLP: refnet/training_check.py.  All three are exported by `import refnet`.

`tier=` is the required tier (bitwise, ulp or tolerance; what each means: docs/verification.md):
a check passes when its tier is that good or better.  The message of a failed check names the
tensor, the worst index, both values there, the distance in ulps, how many elements differ and
what share, and the thresholds.  See docs/check-api.md.
"""
from dataclasses import dataclass, field

# GRADED and required_tier are re-exported: the pytest plugin reads them from here
from refnet.compare import (DEFAULT_TIER, GRADED, TIERS, compare_tensors, is_mismatch,  # noqa: F401
                            render, required_tier)


def _name(name, default):
    if name is None:
        return default
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty string, got {name!r}")
    return name


# --- one pair of tensors ---------------------------------------------------------------------
def compare(actual, expected, *, name=None, tier=None, kind="grad", scale=None):
    """Grade `actual` against `expected`; return a Verdict (never raises on a mismatch).

    Strict: the shapes, dtypes and devices must be equal; a [64] tensor against a [1, 64] one is a
    `fail` that says so, never a broadcast.  Floating tensors (float32, float64) are graded
    bitwise / ulp / tolerance / fail; integer and bool tensors are equal (bitwise) or fail.
    tier: the required tier (default "tolerance"); `verdict.passed` says whether it was met.
    kind: "grad" or "forward" picks the rtol/atol row of refnet.compare.TOLERANCES.
    The tolerance tier allows |actual - expected| <= atol + rtol*|expected| with
    atol = min(table atol, rtol * max|expected|): relative to the reference's own size, so an
    all-zeros or off-by-a-factor answer never passes.  scale (a number or tensor): the size of
    what `expected` is computed from, for a reference that is mathematically zero (rounding noise
    of larger terms); then max|scale| replaces max|expected|.

    >>> import torch, refnet
    >>> one = torch.tensor([1.0, 2.0])
    >>> refnet.compare(torch.nextafter(one, one + 1), one, name="next").tier
    'ulp'
    >>> refnet.compare(torch.ones(64), torch.ones(1, 64)).passed
    False
    """
    return compare_tensors(_name(name, "tensor"), actual, expected, kind, tier=tier, scale=scale)


def describe(verdict, required=None):
    """A multi-line report of a verdict for a failing assertion (refnet.compare.render): tier
    against the required one, how many elements differ and what share, the worst index with both
    values and their distance in ulps, and the thresholds."""
    return render(verdict, required, block=True)


def assert_same(actual, expected, *, tier=DEFAULT_TIER, name=None, kind="grad", scale=None):
    """Assert that `actual` matches `expected` at `tier` or better; return the Verdict.

    Raises AssertionError with refnet's report (see `describe`) otherwise.  Like
    torch.testing.assert_close, but graded and strict: no broadcasting, no dtype promotion, no
    device moves, NaN on one side only always fails.

    >>> import torch, refnet
    >>> x = torch.randn(3, 4, dtype=torch.float64)
    >>> refnet.assert_same(x * 2, x + x, tier="bitwise", name="double").tier
    'bitwise'
    """
    __tracebackhide__ = True
    required = required_tier(tier)
    verdict = compare(actual, expected, name=name, tier=required, kind=kind, scale=scale)
    if not verdict.passed:
        raise AssertionError(describe(verdict, required))
    return verdict


# --- many verdicts ---------------------------------------------------------------------------
class Report(list):
    """A list of Verdicts with a summary: .tier (the worst), .passed, .failures(), str()."""

    def __init__(self, verdicts=(), *, required=DEFAULT_TIER, title="refnet"):
        super().__init__(verdicts)
        self.required = required
        self.title = title
        self.forward = None      # check_backward: the verdict of the forward output
        self.fd = None           # check_backward(fd=True): a Report against finite differences

    @property
    def tier(self):
        every = list(self) + ([self.forward] if self.forward is not None else [])
        return max((v.tier for v in every), key=TIERS.index, default="bitwise")

    @property
    def passed(self):
        return (all(v.passed for v in self) and (self.forward is None or self.forward.passed)
                and (self.fd is None or self.fd.passed))

    def __bool__(self):
        # true only when every check passed: `assert report` cannot pass silently
        return self.passed

    def __getitem__(self, key):
        if isinstance(key, str):
            for v in self:
                if v.name == key:
                    return v
            raise KeyError(f"{key!r}: no verdict of that name; names: {[v.name for v in self]}")
        return super().__getitem__(key)

    def failures(self):
        """The Verdicts that missed the required tier (forward, gradients, then finite
        differences); `describe(v, report.required)` renders one."""
        return self._own_failures() + (self.fd.failures() if self.fd is not None else [])

    def _own_failures(self):
        every = ([self.forward] if self.forward is not None else []) + list(self)
        return [v for v in every if not v.passed]

    def messages(self):
        """The multi-line report of every failed verdict, each against its report's tier."""
        return [describe(v, self.required) for v in self._own_failures()] + \
            (self.fd.messages() if self.fd is not None else [])

    def table(self):
        width = max((len(v.name) for v in self), default=4)
        rows = []
        for v in self:
            mark = "ok  " if v.passed else "FAIL"
            if v.numel and v.tier != "bitwise" and v.worst_index is not None:
                detail = (f"max rel error {v.max_rel_diff:.3g}" if v.ulp_limit is None else
                          f"max ulp {v.max_ulp:.6g}") + f", max abs diff {v.max_abs_diff:.3g}"
            else:
                detail = v.note
            rows.append(f"  {mark} {v.name:<{width}}  {v.tier:<9} {detail}".rstrip())
        return "\n".join(rows)

    def __str__(self):
        text = (f"{self.title}: {len(self)} checks, worst tier {self.tier!r}, required "
                f"{self.required!r}: {'passed' if self.passed else 'FAILED'}\n{self.table()}")
        if self.forward is not None and self.forward.tier != "bitwise":
            text += f"\n  forward output: {self.forward.tier}"
        return text + (f"\n{self.fd}" if self.fd is not None else "")

    def assert_ok(self):
        """Raise AssertionError with every failing verdict's report; return self when all pass."""
        __tracebackhide__ = True
        if not self.passed:
            raise AssertionError(str(self) + "\n" + "\n".join(self.messages()))
        return self


# --- a chain of intermediates ----------------------------------------------------------------
@dataclass
class Trace:
    """The verdicts of a chain, in order, and the first that departs (None when none does)."""
    verdicts: Report
    first_departure: str | None = None
    after: list = field(default_factory=list)
    first_value_departure: str | None = None   # the first that departs in value, not in shape/dtype

    @property
    def passed(self):
        return self.first_departure is None

    def __bool__(self):
        return self.passed

    def __getitem__(self, name):
        return self.verdicts[name]

    def __str__(self):
        n = len(self.verdicts)
        if self.first_departure is None:
            head = (f"refnet trace: {n} intermediates agree at {self.verdicts.required!r} or "
                    f"better (worst tier {self.verdicts.tier!r})")
        else:
            pos = [v.name for v in self.verdicts].index(self.first_departure) + 1
            head = (f"refnet trace: first departure at #{pos} of {n}: {self.first_departure!r} "
                    f"({self.verdicts[self.first_departure].tier}, required "
                    f"{self.verdicts.required!r}); the ones after it: "
                    + (", ".join(f"{v.name} {v.tier}" for v in self.after) or "none"))
        value = self.first_value_departure
        if value is not None and value != self.first_departure:
            head += (f"\nfirst value departure: {value!r} ({self.verdicts[value].tier}); the one "
                     f"above departs in shape, dtype or device only")
        lines = [head, self.verdicts.table()]
        for name in dict.fromkeys(filter(None, [self.first_departure, value])):
            lines.append(describe(self.verdicts[name], self.verdicts.required))
        return "\n".join(lines)

    def assert_ok(self):
        __tracebackhide__ = True
        if not self.passed:
            raise AssertionError(str(self))
        return self


def trace_compare(manual, reference, *, tier=DEFAULT_TIER, scale=None):
    """Compare a chain of intermediates (manual[name] against reference[name]) in the order of
    `manual`, and report the FIRST that departs from the required tier, and the ones after it.

    manual: dict name -> tensor, in the order of the computation (a backward pass: dlogprobs
        first ... dC last).  reference: dict with at least the same names (extra names ignored).
    scale: dict name -> number or tensor, the size a mathematically-zero intermediate is rounding
        noise of (refnet.compare's `scale`), e.g. {"db1": manual["dhprebn"]} for a bias before
        batch norm.
    The Trace names the first departure and, when that one departs only in shape, dtype or
    device (a keepdim difference), the first departure in value too.

    >>> import torch, refnet
    >>> x = torch.randn(5, requires_grad=True); y = x.exp(); z = y.sum(); z.backward()
    >>> dy = torch.ones(5); dx = dy * y.detach()
    >>> refnet.trace_compare({"dy": dy, "dx": dx}, {"dy": torch.ones(5), "dx": x.grad}).passed
    True
    """
    required = required_tier(tier)
    for arg, d in (("manual", manual), ("reference", reference)):
        if not isinstance(d, dict):
            raise TypeError(f"{arg}: expected a dict of name -> tensor, got {type(d).__name__}")
    if not manual:
        raise ValueError("manual: expected at least one intermediate, got an empty dict")
    missing = [k for k in manual if k not in reference]
    if missing:
        raise ValueError(f"reference: no tensor for {missing}; expected every name of manual "
                         f"({', '.join(manual)})")
    scale = _scales(scale, manual)
    verdicts = Report([compare(manual[k], reference[k], name=k, tier=required, scale=scale.get(k))
                       for k in manual], required=required, title="refnet trace")
    first = next((i for i, v in enumerate(verdicts) if not v.passed), None)
    if first is None:
        return Trace(verdicts)
    value = next((v.name for v in verdicts if not v.passed and not is_mismatch(v)), None)
    return Trace(verdicts, verdicts[first].name, list(verdicts[first + 1:]), value)


def _scales(scale, manual):
    if scale is None:
        return {}
    if not isinstance(scale, dict) or any(k not in manual for k in scale):
        raise ValueError(f"scale: expected a dict whose names are among manual's "
                         f"({', '.join(manual)}), got {scale!r:.80}")
    return scale
