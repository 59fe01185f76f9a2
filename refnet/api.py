"""refnet's checks for anyone's code: grade two tensors, a hand-written backward, a chain of
intermediates, or a training run against a reference.

Every check grades with refnet's tiers (refnet.compare), best first:

  bitwise    identical bits everywhere (NaN against NaN at the same index counts as agreement)
  ulp        every element within ULP_LIMIT (8) units in the last place
  tolerance  |actual − expected| <= atol + rtol·|expected| everywhere (rtol/atol by dtype)
  fail       anything else: a shape, dtype or device mismatch (never broadcast), NaN on one side

`tier=` is the required tier: a check passes when its tier is that good or better.  The message of a
failed check names the tensor, the worst index, both values there, the distance in ulps, how many
elements differ and what share, and the thresholds.  See docs/check-api.md.
"""
from dataclasses import dataclass, field
import inspect
import math

import torch

from refnet import data as datasets
from refnet import harness
from refnet import twin as twin_mod
from refnet.compare import TIERS, Verdict, compare_curves, compare_tensors
from refnet.oracles.fd import FDSettings, rel_error, sample_indices

GRADED = TIERS[:3]          # the tiers a check may require: bitwise, ulp, tolerance
DEFAULT_TIER = "tolerance"


def _required(tier, arg="tier"):
    if tier is None:
        return DEFAULT_TIER
    if tier not in GRADED:
        raise ValueError(f"{arg}: expected one of {', '.join(GRADED)}, got {tier!r}")
    return tier


def _name(name, default):
    if name is None:
        return default
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty string, got {name!r}")
    return name


def _describe_tensor(t):
    return f"{list(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


# --- one pair of tensors ---------------------------------------------------------------------
def compare(actual, expected, *, name=None, tier=None, kind="grad"):
    """Grade `actual` against `expected`; return a Verdict (never raises on a mismatch).

    Strict: the shapes, dtypes and devices must be equal; a [64] tensor against a [1, 64] one is a
    `fail` that says so, never a broadcast.  Floating tensors (float32, float64) are graded
    bitwise / ulp / tolerance / fail; integer and bool tensors are equal (bitwise) or fail.
    tier: the required tier (default "tolerance"); `verdict.passed` says whether it was met.
    kind: "grad" or "forward" picks the rtol/atol row of refnet.compare.TOLERANCES.

    >>> import torch, refnet
    >>> one = torch.tensor([1.0, 2.0])
    >>> refnet.compare(torch.nextafter(one, one + 1), one, name="next").tier
    'ulp'
    >>> refnet.compare(torch.ones(64), torch.ones(1, 64)).passed
    False
    """
    required = _required(tier)
    name = _name(name, "tensor")
    for arg, t in (("actual", actual), ("expected", expected)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg}: expected a torch.Tensor for {name!r}, got {type(t).__name__}"
                            + (" (convert it with torch.as_tensor first)"
                               if isinstance(t, (int, float, list, tuple)) or hasattr(t, "__array__")
                               else ""))
    base = dict(name=name, shape=list(expected.shape),
                dtype=str(expected.dtype).replace("torch.", ""), device=str(expected.device))
    what = []
    if actual.shape != expected.shape:
        what.append(f"shape {list(actual.shape)} vs {list(expected.shape)}")
    if actual.dtype != expected.dtype:
        what.append(f"dtype {actual.dtype} vs {expected.dtype}")
    if actual.device != expected.device:
        what.append(f"device {actual.device} vs {expected.device}")
    if what:
        return Verdict(tier="fail", passed=False, numel=expected.numel(), note=(
            f"mismatch: {', '.join(what)} (actual vs expected); refnet never broadcasts, casts or "
            f"moves: make both sides {_describe_tensor(expected)} explicitly if that is what you "
            f"mean"), **base)
    if expected.is_floating_point() and expected.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: dtype {expected.dtype} is not graded; refnet grades float32 and "
                        f"float64 (integers and bool exactly); cast both sides if you mean it")
    if expected.is_complex():
        raise TypeError(f"{name}: complex tensors are not graded; compare .real and .imag")
    verdict = compare_tensors(name, actual, expected, kind, required=required)
    verdict.device = str(expected.device)
    if expected.is_floating_point() and expected.numel():
        a, b = actual.detach().cpu(), expected.detach().cpu()
        only_a = int((torch.isnan(a) & ~torch.isnan(b)).sum())
        only_b = int((torch.isnan(b) & ~torch.isnan(a)).sum())
        if only_a or only_b:
            verdict.note = "; ".join(filter(None, [
                f"NaN on one side only: {only_a} in actual, {only_b} in expected", verdict.note]))
    return verdict


def describe(verdict, required=None):
    """A multi-line report of a verdict for a failing assertion: tier against the required one,
    how many elements differ and what share, the worst index with both values and their distance
    in ulps, and the thresholds."""
    v = verdict
    head = f"refnet: {v.name} is {v.tier!r}"
    if required is not None:
        head += f", required {required!r} or better"
    lines = [head, f"  expected: {v.shape} {v.dtype} on {v.device}"]
    sampled = v.ulp_limit is None        # a finite-difference verdict: sampled coordinates
    if v.numel and (v.mismatched or v.worst_index is not None):
        share = 100.0 * v.mismatched / v.numel
        what = "sampled coordinates miss the threshold" if sampled else "elements differ in their bits"
        lines.append(f"  {v.mismatched} of {v.numel} {what} ({share:.3g}%)")
    if v.worst_index is not None:
        a, b = v.worst_values
        ulp = "" if math.isnan(v.max_ulp) else \
            ("inf ulp apart; " if v.max_ulp == math.inf else f"{v.max_ulp:.6g} ulp apart; ")
        lines.append(f"  worst at index {v.worst_index}: actual {a!r} vs expected {b!r} "
                     f"({ulp}max abs diff {v.max_abs_diff:.3g}, max rel diff {v.max_rel_diff:.3g})")
    if v.rtol is not None and sampled:
        lines.append(f"  thresholds: rel_error |a - n| / (|a| + |n|) <= {v.rtol:g}, or "
                     f"|a - n| <= {v.atol:g}")
    elif v.rtol is not None:
        ulp_part = f"ulp <= {v.ulp_limit}; " if v.ulp_limit is not None else ""
        lines.append(f"  thresholds: {ulp_part}tolerance |actual - expected| <= {v.atol:g} + "
                     f"{v.rtol:g}*|expected|")
    if v.note:
        lines.append(f"  note: {v.note}")
    return "\n".join(lines)


def assert_same(actual, expected, *, tier=DEFAULT_TIER, name=None, kind="grad"):
    """Assert that `actual` matches `expected` at `tier` or better; return the Verdict.

    Raises AssertionError with refnet's report (see `describe`) otherwise.  Like
    torch.testing.assert_close, but graded and strict: no broadcasting, no dtype promotion, no
    device moves, NaN on one side only always fails.

    >>> import torch, refnet
    >>> x = torch.randn(3, 4, dtype=torch.float64)
    >>> refnet.assert_same(x * 2, x + x, tier="bitwise", name="double").tier
    'bitwise'
    """
    required = _required(tier)
    verdict = compare(actual, expected, name=name, tier=required, kind=kind)
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
        every = ([self.forward] if self.forward is not None else []) + list(self)
        return [describe(v, self.required) for v in every if not v.passed] + \
            (self.fd.failures() if self.fd is not None else [])

    def table(self):
        width = max((len(v.name) for v in self), default=4)
        rows = []
        for v in self:
            mark = "ok  " if v.passed else "FAIL"
            if v.numel and v.tier != "bitwise" and v.worst_index is not None:
                detail = (f"max rel error {v.max_rel_diff:.3g}" if math.isnan(v.max_ulp) else
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
        if not self.passed:
            raise AssertionError(str(self) + "\n" + "\n".join(self.failures()))
        return self


# --- a hand-written backward -----------------------------------------------------------------
def _arg_names(fn, n):
    try:
        params = [p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"input{i}" for i in range(n)]


def _split_out(result, fn_name):
    """(out, cache, has_cache): a tuple/list (out, cache) is the CS231n shape."""
    if isinstance(result, (tuple, list)):
        if len(result) != 2 or not isinstance(result[0], torch.Tensor):
            raise TypeError(f"fn: {fn_name} returned a {type(result).__name__} of {len(result)}; "
                            f"expected one tensor, or (out, cache) for a forward/backward pair")
        return result[0], result[1], True
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"fn: {fn_name} returned {type(result).__name__}; expected a tensor or "
                        f"(out, cache)")
    return result, None, False


def _as_grads(result, n, names):
    if isinstance(result, torch.Tensor):
        result = (result,)
    if not isinstance(result, (tuple, list)):
        raise TypeError(f"backward_fn: returned {type(result).__name__}; expected a tuple of {n} "
                        f"gradients ({', '.join(names)})")
    if len(result) != n:
        raise ValueError(f"backward_fn: returned {len(result)} gradient(s), expected {n}, one per "
                         f"differentiated input in order: {', '.join(names)}")
    for g, nm in zip(result, names):
        if g is not None and not isinstance(g, torch.Tensor):
            raise TypeError(f"backward_fn: gradient {nm} is a {type(g).__name__}; expected a "
                            f"torch.Tensor shaped like its input")
    return list(result)


def _fresh(inputs, wrt, requires_grad, dtype=None):
    out = []
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor):
            t = t.detach().clone()
            if i in wrt:
                if dtype is not None:
                    t = t.to(dtype)
                t.requires_grad_(requires_grad)
        out.append(t)
    return out


def check_backward(fn, inputs, backward_fn=None, *, tier=DEFAULT_TIER, reference=None, dout=None,
                   wrt=None, names=None, seed=0, fd=False, fd_settings=None):
    """Check a hand-written backward against autograd; return a Report with one Verdict per
    gradient (and `report.forward`, the verdict of fn's output against reference's).

    fn(*inputs): either returns the output tensor, and then `backward_fn(dout, *inputs)` returns
        the gradients; or returns `(out, cache)` (the CS231n shape), and then
        `backward_fn(dout, cache)` returns them.  Gradients come as a tuple in input order, one
        per differentiated input (a single tensor when there is one).
    inputs: a list of arguments for fn.  Every floating-point tensor among them is differentiated
        (or those at the indices in `wrt`); other arguments (labels, settings) are passed as is.
    backward_fn=None: the gradients under test are autograd's through fn itself (a custom
        torch.autograd.Function); `reference` is then required.
    reference: a function of the same inputs built from stock torch ops whose autograd gradients
        are the reference (default: fn itself, run under autograd).
    dout: the upstream gradient (default: seeded standard normal, shaped like the output).
    names: gradient names (default: "d" + fn's argument names, e.g. dx, dw, db).
    fd=True: also compare the hand-written backward, run in float64, with central differences of
        sum(fn(inputs) * dout) in float64 (refnet's FD settings; at a kink, where the one-sided
        differences disagree, the analytic value is accepted between them).

    >>> import torch, refnet
    >>> def tanh_forward(x): y = torch.tanh(x); return y, y
    >>> def tanh_backward(dout, y): return dout * (1 - y * y)
    >>> x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    >>> report = refnet.check_backward(tanh_forward, [x], tanh_backward)
    >>> report.passed, [v.name for v in report]
    (True, ['dx'])
    """
    required = _required(tier)
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    if backward_fn is not None and not callable(backward_fn):
        raise TypeError(f"backward_fn: expected a callable or None, got {type(backward_fn).__name__}")
    if backward_fn is None and reference is None:
        raise ValueError("reference: with backward_fn=None (autograd through fn, e.g. a custom "
                         "autograd.Function) a reference function of stock torch ops is required")
    if reference is not None and not callable(reference):
        raise TypeError(f"reference: expected a callable, got {type(reference).__name__}")
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"inputs: expected a list of fn's arguments, got {type(inputs).__name__}")
    floats = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if wrt is None:
        wrt = floats
    else:
        wrt = list(wrt)
        bad = [i for i in wrt if i not in floats]
        if bad:
            raise ValueError(f"wrt: inputs {bad} are not floating-point tensors; expected indices "
                             f"among {floats}")
    if not wrt:
        raise ValueError("inputs: no floating-point tensor to differentiate")
    fn_name = getattr(fn, "__name__", type(fn).__name__)
    arg_names = _arg_names(reference if backward_fn is None else fn, len(inputs))
    if names is None:
        names = [f"d{arg_names[i]}" for i in wrt]
    elif len(names) != len(wrt):
        raise ValueError(f"names: expected {len(wrt)} names (one per gradient), got {len(names)}")
    ref_fn = reference or fn

    # reference: autograd through `reference` (default fn)
    ref_in = _fresh(inputs, wrt, True)
    ref_out, _, _ = _split_out(ref_fn(*ref_in), getattr(ref_fn, "__name__", "reference"))
    if not ref_out.is_floating_point():
        raise TypeError(f"fn: output is {ref_out.dtype}; expected a floating-point tensor")
    if dout is None:
        gen = torch.Generator().manual_seed(seed)
        dout = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64).to(
            dtype=ref_out.dtype, device=ref_out.device)
    elif not isinstance(dout, torch.Tensor):
        raise TypeError(f"dout: expected a tensor shaped like fn's output, got {type(dout).__name__}")
    elif dout.shape != ref_out.shape:
        raise ValueError(f"dout: expected shape {list(ref_out.shape)} (fn's output), got "
                         f"{list(dout.shape)}")
    if not ref_out.requires_grad:
        raise ValueError(f"reference: the output of {getattr(ref_fn, '__name__', 'reference')} "
                         f"does not depend on the inputs through autograd (detached, computed "
                         f"under no_grad, or via numpy); expected stock torch ops")
    ref_grads = torch.autograd.grad(ref_out, [ref_in[i] for i in wrt], dout, allow_unused=True)
    ref_grads = [torch.zeros_like(ref_in[i]) if g is None else g for g, i in zip(ref_grads, wrt)]

    # under test: the user's backward (no autograd), or autograd through fn (custom Function)
    if backward_fn is None:
        test_in = _fresh(inputs, wrt, True)
        out, _, _ = _split_out(fn(*test_in), fn_name)
        grads = torch.autograd.grad(out, [test_in[i] for i in wrt], dout, allow_unused=True)
        grads = [torch.zeros_like(test_in[i]) if g is None else g for g, i in zip(grads, wrt)]
    else:
        test_in = _fresh(inputs, wrt, False)
        with torch.no_grad():
            out, cache, has_cache = _split_out(fn(*test_in), fn_name)
            result = backward_fn(dout, cache) if has_cache else backward_fn(dout, *test_in)
        grads = _as_grads(result, len(wrt), names)

    report = Report(required=required, title=f"refnet.check_backward({fn_name})")
    report.forward = compare(out.detach(), ref_out.detach(), name="out", tier=required,
                             kind="forward")
    for g, r, nm in zip(grads, ref_grads, names):
        if g is None:
            report.append(Verdict(name=nm, tier="fail", passed=False, shape=list(r.shape),
                                  dtype=str(r.dtype).replace("torch.", ""), device=str(r.device),
                                  note="backward_fn returned None for this gradient"))
        else:
            report.append(compare(g.detach(), r.detach(), name=nm, tier=required))
    if fd:
        if backward_fn is None:
            raise ValueError("fd: finite differences check a hand-written backward_fn; with "
                             "backward_fn=None compare against `reference` instead")
        report.fd = Report(_fd_verdicts(fn, inputs, backward_fn, wrt, names, dout, fd_settings or
                                        FDSettings(), seed),
                           required="tolerance", title="finite differences (float64)")
    if not report.forward.passed:
        for v in report:
            v.note = "; ".join(filter(None, [v.note, f"the forward output already differs "
                                             f"({report.forward.tier})"]))
    return report


def _fd_verdicts(fn, inputs, backward_fn, wrt, names, dout, st, seed):
    """Hand-written backward in float64 vs central differences of sum(fn(inputs)·dout)."""
    x64 = _fresh(inputs, wrt, False, dtype=torch.float64)
    dout64 = dout.detach().to(torch.float64)

    def value():
        out, _, _ = _split_out(fn(*x64), "fn")
        return float((out.to(torch.float64) * dout64).sum())

    with torch.no_grad():
        out, cache, has_cache = _split_out(fn(*x64), "fn")
        analytic = _as_grads(backward_fn(dout64, cache) if has_cache else backward_fn(dout64, *x64),
                             len(wrt), names)
        base = value()
        atol = st.atol_scale * max(1.0, abs(base))
        gen = torch.Generator().manual_seed(seed)
        verdicts = []
        for i, nm, a_full in zip(wrt, names, analytic):
            t = x64[i]
            if a_full is None or a_full.shape != t.shape:
                verdicts.append(Verdict(name=f"{nm} (finite differences)", tier="fail",
                                        passed=False, shape=list(t.shape), dtype="float64",
                                        device=str(t.device),
                                        note="the float64 backward returned no gradient or a "
                                             "wrong shape"))
                continue
            flat, a_flat = t.view(-1), a_full.detach().to(torch.float64).reshape(-1).cpu()
            idx = sample_indices(flat.numel(), st.per_tensor, gen)
            worst, worst_j, bad, kinks = -1.0, None, 0, 0
            numeric = torch.empty(len(idx), dtype=torch.float64)
            for j, k in enumerate(idx.tolist()):
                old = flat[k].item()
                flat[k] = old + st.eps
                lp = value()
                flat[k] = old - st.eps
                lm = value()
                flat[k] = old
                central = (lp - lm) / (2 * st.eps)
                fwd, bwd = (lp - base) / st.eps, (base - lm) / st.eps
                a = float(a_flat[k])
                numeric[j] = central
                if abs(fwd - bwd) > max(atol, st.kink_rtol * (abs(fwd) + abs(bwd))):
                    kinks += 1   # a kink: accept between the one-sided differences
                    ok = min(fwd, bwd) - atol <= a <= max(fwd, bwd) + atol
                else:
                    ok = abs(a - central) <= atol or \
                        abs(a - central) <= st.rtol * max(abs(a) + abs(central), 1e-300)
                err = float(rel_error(torch.tensor(a), torch.tensor(central)))
                score = err + (10.0 if not ok else 0.0)
                bad += not ok
                if score > worst:
                    worst, worst_j = score, j
            a_s = a_flat[idx]
            diff = (a_s - numeric).abs()
            v = Verdict(name=f"{nm} (finite differences)", tier="fail" if bad else "tolerance",
                        passed=not bad, shape=list(t.shape), dtype="float64", device=str(t.device),
                        numel=len(idx), mismatched=bad, max_abs_diff=float(diff.max()),
                        max_rel_diff=float(rel_error(a_s, numeric).max()), rtol=st.rtol,
                        atol=atol, note=f"{len(idx)}/{flat.numel()} coordinates, {kinks} at a kink "
                                        f"(accepted between the one-sided differences); central "
                                        f"differences in float64, h {st.eps:g}")
            if worst_j is not None:
                k = int(idx[worst_j])
                v.worst_index = [int(c) for c in torch.unravel_index(torch.tensor(k), t.shape)] \
                    if t.dim() else []
                v.worst_values = [float(a_s[worst_j]), float(numeric[worst_j])]
                v.max_ulp = math.nan
            verdicts.append(v)
    return verdicts


# --- a chain of intermediates ----------------------------------------------------------------
@dataclass
class Trace:
    """The verdicts of a chain, in order, and the first that departs (None when none does)."""
    verdicts: Report
    first_departure: str | None = None
    after: list = field(default_factory=list)

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
        lines = [head, self.verdicts.table()]
        if self.first_departure is not None:
            lines.append(describe(self.verdicts[self.first_departure], self.verdicts.required))
        return "\n".join(lines)

    def assert_ok(self):
        if not self.passed:
            raise AssertionError(str(self))
        return self


def trace_compare(manual, reference, *, tier=DEFAULT_TIER):
    """Compare a chain of intermediates (manual[name] against reference[name]) in the order of
    `manual`, and report the FIRST that departs from the required tier, and the ones after it.

    manual: dict name -> tensor, in the order of the computation (a backward pass: dlogprobs
        first ... dC last).  reference: dict with at least the same names (extra names ignored).

    >>> import torch, refnet
    >>> x = torch.randn(5, requires_grad=True); y = x.exp(); z = y.sum(); z.backward()
    >>> dy = torch.ones(5); dx = dy * y.detach()
    >>> refnet.trace_compare({"dy": dy, "dx": dx}, {"dy": torch.ones(5), "dx": x.grad}).passed
    True
    """
    required = _required(tier)
    for arg, d in (("manual", manual), ("reference", reference)):
        if not isinstance(d, dict):
            raise TypeError(f"{arg}: expected a dict of name -> tensor, got {type(d).__name__}")
    if not manual:
        raise ValueError("manual: expected at least one intermediate, got an empty dict")
    missing = [k for k in manual if k not in reference]
    if missing:
        raise ValueError(f"reference: no tensor for {missing}; expected every name of manual "
                         f"({', '.join(manual)})")
    verdicts = Report([compare(manual[k], reference[k], name=k, tier=required) for k in manual],
                      required=required, title="refnet trace")
    first = next((i for i, v in enumerate(verdicts) if not v.passed), None)
    if first is None:
        return Trace(verdicts)
    return Trace(verdicts, verdicts[first].name, list(verdicts[first + 1:]))


# --- a training run of refnet's MLP ----------------------------------------------------------
@dataclass
class TrainingCheck:
    """What check_training found.  verdict: "identical", "rounds differently" or "wrong gradient".

    grad_checks: (step, Report) at each checked step: the manual gradients against the twin's,
        both computed from the SAME parameters (the manual side's at that step) and batch, so a
        tier here measures the gradient, not the drift of the trajectory.
    curve: the loss-curve verdict (first step the curves part, identical steps).
    growth: (step, max |Δloss|, max |Δloss| / max(|loss_manual|, |loss_twin|)) over the steps
        since the previous check (up to and including `step`).
    """
    verdict: str
    passed: bool
    required: str
    curve: Verdict
    grad_checks: list
    growth: list
    message: str

    def __bool__(self):
        return self.passed

    def __str__(self):
        return self.message


def check_training(spec, *, pair=None, data=None, steps=None, check_every=None,
                   tier=DEFAULT_TIER):
    """Train a spec's manual MLP and its autograd twin in lockstep and grade honestly.

    Two implementations that round differently (e.g. tanh's backward as dout·(1 − y·y) instead
    of PyTorch's fused form) agree to an ulp at step 0 but part over a long run: training
    amplifies every difference.  That is not a wrong gradient.  So at every `check_every`-th
    step the gradients are compared from the same parameters and batch, and:

      identical           the loss curves are bitwise equal
      rounds differently  every checked gradient meets `tier` but the curves part: reported with
                          the step they part and how |Δloss| grows; passed
      wrong gradient      a checked gradient fails `tier` (a wrong backward fails at step 0)

    spec: a refnet.Spec; pair: a Pair from build_pair (default build_pair(spec)); its `.mlp` may
    be any object with forward/backward/train_step/params like manual.mlp.MLP.
    data: (x, target) (default load_data(spec)).  steps: default spec.steps.
    check_every: default max(1, steps // 10).

    >>> import refnet
    >>> spec = refnet.Spec.from_dict({"sizes": [2, 8, 1], "activation": "tanh", "data": "xor",
    ...                               "dtype": "float32", "steps": 20})
    >>> refnet.check_training(spec).verdict
    'identical'
    """
    required = _required(tier)
    pair = pair or harness.build_pair(spec)
    x, target = data if data is not None else datasets.load_data(spec)
    steps = spec.steps if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    check_every = max(1, steps // 10) if check_every is None else check_every
    if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 1:
        raise ValueError(f"check_every: expected an integer >= 1, got {check_every!r}")
    scratch = twin_mod.Twin(spec.sizes, spec.activation, spec.bias, dtype=spec.torch_dtype,
                            device=spec.device, **spec.options)
    scratch_loss = twin_mod.loss_module(spec.loss, spec.reg, scratch)
    grad_checks, growth, losses_m, losses_t = [], [], [], []
    window = [0.0, 0.0]          # the largest |Δloss| and |Δloss|/|loss| since the last check
    for step, idx in enumerate(datasets.batches(x.shape[0], spec.batch_size, steps, spec.seed)):
        xb, tb = (x, target) if idx is None else (x[idx.to(x.device)], target[idx.to(x.device)])
        checked = step % check_every == 0 or step == steps - 1
        if checked:
            grad_checks.append((step, _grads_at(pair.mlp, scratch, scratch_loss, xb, tb,
                                                required, step)))
        loss_m = pair.mlp.train_step(xb, tb).detach()
        pair.twin_opt.zero_grad(set_to_none=True)
        loss_t = pair.twin_loss(pair.twin(xb), tb)
        loss_t.backward()
        pair.twin_opt.step()
        losses_m.append(loss_m)
        losses_t.append(loss_t.detach())
        diff = abs(float(loss_m) - float(losses_t[-1]))
        rel = diff / max(abs(float(loss_m)), abs(float(losses_t[-1]))) if diff else 0.0
        window = [max(window[0], diff), max(window[1], rel)]
        if checked:
            growth.append((step, window[0], window[1]))
            window = [0.0, 0.0]
    curve = compare_curves("loss_curve", torch.stack(losses_m), torch.stack(losses_t),
                           required=required)
    worst = max((r.tier for _, r in grad_checks), key=TIERS.index)
    tiers = ", ".join(f"{s}: {r.tier}" for s, r in grad_checks)
    wrong = next(((s, r) for s, r in grad_checks if not r.passed), None)
    if wrong is not None:
        s, r = wrong
        bad = next(v for v in r if not v.passed)
        verdict, passed = "wrong gradient", False
        message = (f"wrong gradient: at step {s} {bad.name} is {bad.tier!r} from the same "
                   f"parameters (required {required!r}); gradient tier by step: {tiers}\n"
                   + describe(bad, required))
    elif curve.first_divergence is None:
        verdict, passed = "identical", True
        message = (f"identical: {steps} steps, loss curves bitwise; gradient tier by step: "
                   f"{tiers}")
    else:
        verdict, passed = "rounds differently", True
        first = curve.first_divergence
        d0 = abs(curve.divergence_values[0] - curve.divergence_values[1])
        peak_step, peak_abs, peak = max(growth, key=lambda g: g[2])
        message = (f"rounds differently: gradients agree at {worst!r} or better at every checked "
                   f"step ({tiers}), but the loss curves part at step {first} (|dloss| {d0:.3g}); "
                   f"the relative difference peaks at {peak:.3g} (|dloss| {peak_abs:.3g}, up to step "
                   f"{peak_step}) and is "
                   f"{growth[-1][2]:.3g} at the end; {curve.identical_steps}/{curve.steps} steps "
                   f"identical, curve tier {curve.tier!r}. Expected when training amplifies "
                   f"rounding (chaotic dynamics), not a wrong gradient. Largest |dloss| / max(|loss|) "
                   f"up to each checked step: " + ", ".join(f"{s}: {r:.3g}" for s, _, r in growth))
    return TrainingCheck(verdict, passed, required, curve, grad_checks, growth, message)


def _grads_at(mlp, scratch, scratch_loss, xb, tb, required, step):
    """The manual gradients against the scratch twin's, both from the manual parameters now."""
    twin_mod.load_params(scratch, mlp.params)
    loss_m, cache = mlp.forward(xb, tb)
    grads_m, _ = mlp.backward(cache)
    scratch.zero_grad(set_to_none=True)
    loss_t = scratch_loss(scratch(xb), tb)
    loss_t.backward()
    grads_t = twin_mod.grads_of(scratch)
    report = Report([compare(loss_m.detach(), loss_t.detach(), name="loss", tier=required,
                             kind="forward")], required=required, title=f"step {step}")
    report.extend(compare(grads_m[n], grads_t[n], name=f"{n}.grad", tier=required)
                  for n in grads_m)
    return report

