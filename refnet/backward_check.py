"""Check a hand-written backward against autograd (and, optionally, float64 finite differences).

`check_backward` is exported as `refnet.check_backward`; docs/check-api.md shows the shapes it
accepts (fn -> out with backward_fn(dout, *inputs); CS231n's (out, cache) with
backward_fn(dout, cache); a custom autograd.Function checked against a stock-ops reference;
NumPy functions, converted at the boundary, against a torch reference).

The default upstream gradient is two douts drawn from refnet's own generator streams (private
64-bit seeds, one normal, one of a different law), never equal to or proportional to an input:
a backward that takes a mask from dout, or transposes a square dW, fails under one of them.
"""
import inspect

import torch

from refnet.api import Report, compare
from refnet.compare import DEFAULT_TIER, TIERS, Verdict, required_tier
from refnet.oracles.fd import FDSettings, fd_verdict, probe, sample_indices

RETURNS = ("out", "out_cache")
# Private generator seeds of the default douts: no user's torch.manual_seed(k) reproduces them.
_DOUT_SEEDS = (0x5DEECE66D2545F49, 0x1B873593CC9E2D51)


# --- NumPy at the boundary ------------------------------------------------------------------------
def _is_numpy(x):
    return type(x).__module__ == "numpy" and hasattr(x, "dtype") and hasattr(x, "__array__")


def _to_torch(x):
    """A NumPy array or scalar as a torch tensor of the same dtype (a copy); anything else as is."""
    return torch.as_tensor(x).clone() if _is_numpy(x) else x


class _Boundary:
    """How the user's functions see tensors: as themselves, or (NumPy mode) as NumPy arrays."""

    def __init__(self, numpy):
        self.numpy = numpy
        self.notes = []

    def args(self, values):
        if not self.numpy:
            return list(values)
        return [v.detach().cpu().numpy().copy() if isinstance(v, torch.Tensor) else v
                for v in values]

    def back(self, value, like, what):
        """A user result as torch; NumPy's float32 -> float64 promotion undone, with a note."""
        value = _to_torch(value)
        if (self.numpy and isinstance(value, torch.Tensor) and like is not None
                and value.dtype == torch.float64 and like.dtype == torch.float32):
            self.notes.append(f"{what}: NumPy returned float64 for float32 (type promotion, e.g. a "
                              f"float64 mask); cast to float32 at the boundary")
            value = value.to(torch.float32)
        return value


# --- the user's results ---------------------------------------------------------------------------
def _arg_names(fns, n):
    """Argument names from the first of fns whose signature names them (else input<i>)."""
    for fn in fns:
        try:
            params = [p.name for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            params = []
        if params:
            return [params[i] if i < len(params) else f"input{i}" for i in range(n)]
    return [f"input{i}" for i in range(n)]


def _is_array(x):
    return isinstance(x, torch.Tensor) or _is_numpy(x)


def _split_out(result, fn_name, returns, arg="fn"):
    """(out, cache, has_cache).  returns="out_cache": CS231n's (out, cache); "out": one output.
    None: a tensor is one output, (out, cache) with a non-array cache (a tuple, a dict) is
    CS231n's; a pair of arrays is ambiguous (two outputs, or an output and its cache?): refused."""
    if isinstance(result, (tuple, list)):
        if returns == "out" or len(result) != 2 or not _is_array(result[0]):
            raise TypeError(f"{arg}: {fn_name} returned a {type(result).__name__} of {len(result)}; "
                            f"expected one tensor" + ("" if returns == "out" else
                                                      ", or (out, cache) for a forward/backward pair"))
        if returns is None and _is_array(result[1]):
            raise TypeError(f"{arg}: {fn_name} returned two arrays: pass returns='out_cache' if "
                            f"the second is a cache for backward_fn(dout, cache) (CS231n), else "
                            f"check one output at a time")
        return result[0], result[1], True
    if not _is_array(result):
        raise TypeError(f"{arg}: {fn_name} returned {type(result).__name__}; expected a tensor or "
                        f"(out, cache)")
    if returns == "out_cache":
        raise TypeError(f"{arg}: {fn_name} returned one tensor; returns='out_cache' expects "
                        f"(out, cache)")
    return result, None, False


def _as_grads(result, n, names):
    if _is_array(result):
        result = (result,)
    if not isinstance(result, (tuple, list)):
        raise TypeError(f"backward_fn: returned {type(result).__name__}; expected a tuple of {n} "
                        f"gradients ({', '.join(names)})")
    if len(result) != n:
        raise ValueError(f"backward_fn: returned {len(result)} gradient(s), expected {n}, one per "
                         f"differentiated input in order: {', '.join(names)}")
    for g, nm in zip(result, names):
        if g is not None and not _is_array(g):
            raise TypeError(f"backward_fn: gradient {nm} is a {type(g).__name__}; expected a "
                            f"torch.Tensor (or NumPy array) shaped like its input")
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
                   wrt=None, names=None, seed=0, fd=False, fd_settings=None, returns=None):
    """Check a hand-written backward against autograd; return a Report with one Verdict per
    gradient (and `report.forward`, the verdict of fn's output against reference's).

    fn(*inputs): either returns the output tensor, and then `backward_fn(dout, *inputs)` returns
        the gradients; or returns `(out, cache)` (the CS231n shape), and then
        `backward_fn(dout, cache)` returns them.  Gradients come as a tuple in input order, one
        per differentiated input (a single tensor when there is one).
    returns: "out" or "out_cache" says which; None infers it: a tensor is one output; a pair is
        (out, cache) when backward_fn's second parameter is named `cache` (CS231n's
        `relu_backward(dout, cache)`) or the second item is not an array (a tuple, a dict); a
        pair of two arrays otherwise is refused as ambiguous (two outputs, or out and a cache?).
    inputs: a list of arguments for fn.  Every floating-point tensor among them is differentiated
        (or those at the indices in `wrt`); other arguments (labels, settings) are passed as is.
        NumPy arrays: fn and backward_fn are NumPy code; they get NumPy arrays (dtypes kept),
        their results are converted back, and `reference` (torch) is required.
    backward_fn=None: the gradients under test are autograd's through fn itself (a custom
        torch.autograd.Function); `reference` is then required.
    reference: a function of the same inputs built from stock torch ops whose autograd gradients
        are the reference (default: fn itself, run under autograd).
    dout: the upstream gradient.  Default: two douts from refnet's private generator streams
        (seeded by `seed`), a standard normal and a ±[0.5, 1.5) uniform, each checked never to
        equal or be proportional to an input; every gradient is graded under both (the worse
        verdict is kept).
    names: gradient names (default: "d" + fn's argument names, e.g. dx, dw, db; report[i] is the
        i-th gradient's verdict whatever its name).
    fd=True: also compare the backward (backward_fn, or autograd through fn when it is None),
        run in float64, with central differences of sum(fn(inputs) * dout) in float64 (refnet's
        FD settings; at a kink the analytic value is accepted between the one-sided differences).
        When FD side with the backward against the reference, the verdict says so.

    >>> import torch, refnet
    >>> def tanh_forward(x): y = torch.tanh(x); return y, (y,)
    >>> def tanh_backward(dout, cache): (y,) = cache; return dout * (1 - y * y)
    >>> x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    >>> report = refnet.check_backward(tanh_forward, [x], tanh_backward)
    >>> report.passed, [v.name for v in report]
    (True, ['dx'])
    """
    __tracebackhide__ = True
    required = required_tier(tier)
    _check_callables(fn, backward_fn, reference, inputs, returns)
    returns = returns or _returns_by_name(backward_fn)
    boundary = _Boundary(any(_is_numpy(t) for t in inputs))
    inputs = [_to_torch(t) for t in inputs]
    wrt = _wrt(inputs, wrt)
    fn_name = getattr(fn, "__name__", type(fn).__name__)
    names = _names(names, [f for f in (fn, reference) if f is not None], len(inputs), wrt)
    ref_out, douts, ref_grads = _reference_grads(reference or fn, inputs, wrt, dout, seed,
                                                 returns if reference is None else "out")
    out, grads = _grads_under_test(fn, fn_name, inputs, wrt, backward_fn, douts, names, returns,
                                   boundary)
    report = Report(required=required, title=f"refnet.check_backward({fn_name})")
    report.forward = compare(out.detach(), ref_out.detach(), name="out", tier=required,
                             kind="forward")
    for k, nm in enumerate(names):
        report.append(_worst([_grade(g[k], r[k], nm, required) for g, r in zip(grads, ref_grads)]))
    if fd:
        verdicts, probes = _fd_verdicts(fn, inputs, backward_fn, wrt, names, douts[0],
                                        fd_settings or FDSettings(), seed, returns, boundary)
        report.fd = Report(verdicts, required="tolerance", title="finite differences (float64)")
        _fd_sides(report, probes, ref_grads[0])
    _annotate(report, boundary.notes)
    return report


def _returns_by_name(backward_fn):
    """"out_cache" when backward_fn reads (dout, cache) by name, else None (infer from fn)."""
    if backward_fn is None:
        return None
    try:
        params = list(inspect.signature(backward_fn).parameters)
    except (TypeError, ValueError):
        return None
    return "out_cache" if params[1:2] == ["cache"] else None


def _names(names, fns, n_inputs, wrt):
    if names is None:
        arg_names = _arg_names(fns, n_inputs)
        return [f"d{arg_names[i]}" for i in wrt]
    if len(names) != len(wrt):
        raise ValueError(f"names: expected {len(wrt)} names (one per gradient), got {len(names)}")
    return list(names)


def _grade(g, r, name, required):
    if g is None:
        return Verdict(name=name, tier="fail", passed=False, shape=list(r.shape),
                       dtype=str(r.dtype).replace("torch.", ""), device=str(r.device),
                       note="backward_fn returned None for this gradient")
    return compare(g.detach(), r.detach(), name=name, tier=required)


def _worst(verdicts):
    """The worse of one gradient's verdicts under the default douts (the first on a tie)."""
    def badness(v):
        return (TIERS.index(v.tier), v.beyond_tolerance or 0, v.max_ulp)
    worst = max(verdicts, key=badness)
    k = verdicts.index(worst)
    if k and verdicts[0].tier != worst.tier:
        worst.note = "; ".join(filter(None, [worst.note, f"under the second default dout (the "
                                             f"first gave {verdicts[0].tier})"]))
    return worst


def _annotate(report, notes):
    if not report.forward.passed:
        for v in report:
            v.note = "; ".join(filter(None, [v.note, f"the forward output already differs "
                                             f"({report.forward.tier})"]))
    for note in dict.fromkeys(notes):
        what = note.split(":")[0]
        for v in [report.forward, *report]:
            if v.name == what:
                v.note = "; ".join(filter(None, [v.note, note]))


def _check_callables(fn, backward_fn, reference, inputs, returns):
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
    if returns is not None and returns not in RETURNS:
        raise ValueError(f"returns: expected one of {', '.join(RETURNS)} or None, got {returns!r}")
    if reference is None and any(_is_numpy(t) for t in inputs):
        raise ValueError("reference: NumPy inputs mean NumPy fn/backward_fn, which autograd cannot "
                         "differentiate; pass reference=, the same function in torch ops")


def _wrt(inputs, wrt):
    """The indices of the inputs to differentiate: every floating tensor, or those of `wrt`."""
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
    return wrt


def _tied_to(d, inputs):
    """True when d equals, or is nearly proportional to, an input (or a square input's
    transpose) of the same number of elements: a dout that could hide a bug."""
    flat = d.reshape(-1).double()
    for t in inputs:
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()) or t.numel() != d.numel() \
                or d.numel() < 2:
            continue
        for u in (t, t.T) if t.dim() == 2 else (t,):
            u = u.detach().reshape(-1).double().cpu()
            cos = float((u @ flat).abs() / (u.norm() * flat.norm()).clamp_min(1e-300))
            if cos > 0.9:
                return True
    return False


def _default_douts(dout, out, seed, inputs):
    """The upstream gradients: [dout] checked against fn's output, or refnet's two defaults."""
    if dout is not None:
        if not isinstance(dout, torch.Tensor):
            dout = _to_torch(dout)
        if not isinstance(dout, torch.Tensor):
            raise TypeError(f"dout: expected a tensor shaped like fn's output, got "
                            f"{type(dout).__name__}")
        if dout.shape != out.shape:
            raise ValueError(f"dout: expected shape {list(out.shape)} (fn's output), got "
                             f"{list(dout.shape)}")
        return [dout]
    douts = []
    for k, base in enumerate(_DOUT_SEEDS):
        for attempt in range(16):
            gen = torch.Generator().manual_seed((base + 7919 * seed + attempt) % 2 ** 63)
            d = torch.randn(out.shape, generator=gen, dtype=torch.float64)
            if k:       # a different law: magnitudes uniform in [0.5, 1.5), random signs
                d = d.sign() * (0.5 + torch.rand(out.shape, generator=gen, dtype=torch.float64))
            if not _tied_to(d, inputs):
                break
        douts.append(d.to(dtype=out.dtype, device=out.device))
    return douts


def _reference_grads(ref_fn, inputs, wrt, dout, seed, returns):
    """(reference output, douts, [autograd's gradients through ref_fn under each dout])."""
    ref_name = getattr(ref_fn, "__name__", "reference")
    ref_in = _fresh(inputs, wrt, True)
    ref_out, _, _ = _split_out(ref_fn(*ref_in), ref_name, returns,
                               arg="fn" if returns != "out" else "reference")
    if not isinstance(ref_out, torch.Tensor) or not ref_out.is_floating_point():
        raise TypeError(f"reference: {ref_name} returned {getattr(ref_out, 'dtype', ref_out)!r}; "
                        f"expected a floating-point torch tensor")
    douts = _default_douts(dout, ref_out, seed, inputs)
    if not ref_out.requires_grad:
        raise ValueError(f"reference: the output of {ref_name} does not depend on the inputs "
                         f"through autograd (detached, computed under no_grad, or via numpy); "
                         f"expected stock torch ops")
    grads = []
    for d in douts:
        g = torch.autograd.grad(ref_out, [ref_in[i] for i in wrt], d, allow_unused=True,
                                retain_graph=True)
        grads.append([torch.zeros_like(ref_in[i]) if gi is None else gi for gi, i in zip(g, wrt)])
    return ref_out, douts, grads


def _grads_under_test(fn, fn_name, inputs, wrt, backward_fn, douts, names, returns, boundary):
    """(fn's output, [the gradients under test under each dout]): the user's backward (no
    autograd), or autograd through fn when backward_fn is None (a custom autograd.Function)."""
    if backward_fn is None:
        test_in = _fresh(inputs, wrt, True)
        out, _, _ = _split_out(fn(*test_in), fn_name, returns)
        grads = []
        for d in douts:
            g = torch.autograd.grad(out, [test_in[i] for i in wrt], d, allow_unused=True,
                                    retain_graph=True)
            grads.append([torch.zeros_like(test_in[i]) if gi is None else gi
                          for gi, i in zip(g, wrt)])
        return out, grads
    args = boundary.args(_fresh(inputs, wrt, False))
    with torch.no_grad():
        out, cache, has_cache = _split_out(fn(*args), fn_name, returns)
        out = boundary.back(out, douts[0], "out")
        grads = []
        for d in douts:
            (ud,) = boundary.args([d])
            result = backward_fn(ud, cache) if has_cache else backward_fn(ud, *args)
            grads.append([boundary.back(g, inputs[i], nm) for g, i, nm in
                          zip(_as_grads(result, len(wrt), names), wrt, names)])
    return out, grads


def _fd_analytic(fn, backward_fn, x64, wrt, names, dout64, returns, boundary):
    """(fn's float64 output, the backward's gradients in float64): backward_fn's, or autograd's
    through fn when backward_fn is None."""
    if backward_fn is None:
        x_ag = [t.detach().requires_grad_(True) if i in wrt else t for i, t in enumerate(x64)]
        out, _, _ = _split_out(fn(*x_ag), "fn", returns)
        grads = torch.autograd.grad(out, [x_ag[i] for i in wrt], dout64.to(out.dtype),
                                    allow_unused=True)
        return out.detach(), [torch.zeros_like(x64[i]) if g is None else g
                              for g, i in zip(grads, wrt)]
    args = boundary.args(x64)
    with torch.no_grad():
        out, cache, has_cache = _split_out(fn(*args), "fn", returns)
        (ud,) = boundary.args([dout64])
        result = backward_fn(ud, cache) if has_cache else backward_fn(ud, *args)
        return _to_torch(out), [None if g is None else _to_torch(g)
                                for g in _as_grads(result, len(wrt), names)]


def _fd_fail(name, t, note):
    return Verdict(name=name, tier="fail", passed=False, shape=list(t.shape), dtype="float64",
                   device=str(t.device), note=note)


def _fd_verdicts(fn, inputs, backward_fn, wrt, names, dout, st, seed, returns, boundary):
    """(verdicts, probes): the backward in float64 vs central differences of sum(fn(inputs)·dout)
    by the one finite-difference rule (refnet.oracles.fd.probe; kinks by the one-sided
    differences).  atol = atol_scale * min(max(1, |L|), sum|out·dout|): never looser than
    verify's rule, and relative to the size of what L sums when that is small."""
    x64 = _fresh(inputs, wrt, False, dtype=torch.float64)
    dout64 = dout.detach().to(torch.float64)
    out64, analytic = _fd_analytic(fn, backward_fn, x64, wrt, names, dout64, returns, boundary)
    names_fd = [f"{nm} (finite differences)" for nm in names]
    if out64.dtype != torch.float64:
        hint = (f"fn returned {out64.dtype} for float64 inputs: the finite-difference run needs fn "
                f"to compute in its inputs' dtype (a hard-coded float32 dtype or cast inside fn?)")
        return [_fd_fail(nm, x64[i], hint) for nm, i in zip(names_fd, wrt)], [None] * len(wrt)

    def loss():
        out, _, _ = _split_out(fn(*boundary.args(x64)), "fn", returns)
        return float((_to_torch(out).to(torch.float64) * dout64).sum()), None

    with torch.no_grad():
        size = float((out64.to(torch.float64) * dout64).abs().sum())
        atol = st.atol_scale * min(max(1.0, abs(loss()[0])), size)
        gen = torch.Generator().manual_seed(seed)
        verdicts, probes = [], []
        for i, name, a_full in zip(wrt, names_fd, analytic):
            t = x64[i]
            if a_full is None or a_full.shape != t.shape:
                verdicts.append(_fd_fail(name, t, "the float64 backward returned no gradient or "
                                                  "a wrong shape"))
                probes.append(None)
                continue
            flat = t.view(-1)
            idx = sample_indices(flat.numel(), st.per_tensor, gen)
            probed = probe(flat, idx, a_full.detach().to(torch.float64).reshape(-1).cpu(), loss,
                           atol, st)
            probes.append(probed)
            verdicts.append(fd_verdict(name, list(t.shape), str(t.device), probed, flat.numel(),
                                       atol, st, f"central differences in float64, h {st.eps:g}"))
    return verdicts, probes


def _fd_sides(report, probes, ref_grads):
    """Where a gradient misses its tier against the reference but passes finite differences,
    and the central differences lie closer to the backward than to the reference at the sampled
    smooth coordinates, say so: the reference may be the imprecise side."""
    for v, fdv, p, r in zip(report, report.fd, probes, ref_grads):
        if v.passed or not fdv.passed or p is None or r.shape != torch.Size(v.shape):
            continue
        smooth = ~p.bracketed
        if not bool(smooth.any()):
            continue
        ref = r.detach().to(torch.float64).reshape(-1).cpu()[p.idx]
        err_ref = float((ref - p.numeric)[smooth].abs().max())
        err_fn = float((p.analytic - p.numeric)[smooth].abs().max())
        if err_fn < err_ref:
            v.note = "; ".join(filter(None, [v.note, (
                f"finite differences side with the backward under test against the reference "
                f"(max |backward - FD| {err_fn:.3g}, |reference - FD| {err_ref:.3g} at "
                f"{int(smooth.sum())} sampled coordinates): the reference's gradient may be the "
                f"imprecise one (e.g. a float32 constant in a float64 kernel)")]))
