"""Check a hand-written backward against autograd (and, optionally, float64 finite differences).

`check_backward` is exported as `refnet.check_backward`; docs/check-api.md shows the three shapes
it accepts (fn -> out with backward_fn(dout, *inputs); CS231n's (out, cache) with
backward_fn(dout, cache); a custom autograd.Function checked against a stock-ops reference).
"""
import inspect

import torch

from refnet.api import Report, compare
from refnet.compare import DEFAULT_TIER, Verdict, required_tier
from refnet.oracles.fd import FDSettings, fd_verdict, probe, sample_indices


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
    required = required_tier(tier)
    _check_callables(fn, backward_fn, reference, inputs, fd)
    wrt = _wrt(inputs, wrt)
    fn_name = getattr(fn, "__name__", type(fn).__name__)
    arg_names = _arg_names(reference if backward_fn is None else fn, len(inputs))
    if names is None:
        names = [f"d{arg_names[i]}" for i in wrt]
    elif len(names) != len(wrt):
        raise ValueError(f"names: expected {len(wrt)} names (one per gradient), got {len(names)}")
    ref_out, dout, ref_grads = _reference_grads(reference or fn, inputs, wrt, dout, seed)
    out, grads = _grads_under_test(fn, fn_name, inputs, wrt, backward_fn, dout, names)

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
        report.fd = Report(_fd_verdicts(fn, inputs, backward_fn, wrt, names, dout, fd_settings or
                                        FDSettings(), seed),
                           required="tolerance", title="finite differences (float64)")
    if not report.forward.passed:
        for v in report:
            v.note = "; ".join(filter(None, [v.note, f"the forward output already differs "
                                             f"({report.forward.tier})"]))
    return report


def _check_callables(fn, backward_fn, reference, inputs, fd):
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
    if fd and backward_fn is None:
        raise ValueError("fd: finite differences check a hand-written backward_fn; with "
                         "backward_fn=None compare against `reference` instead")


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


def _default_dout(dout, out, seed):
    """The upstream gradient: `dout` checked against fn's output, or seeded standard normal."""
    if dout is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(out.shape, generator=gen, dtype=torch.float64).to(
            dtype=out.dtype, device=out.device)
    if not isinstance(dout, torch.Tensor):
        raise TypeError(f"dout: expected a tensor shaped like fn's output, got {type(dout).__name__}")
    if dout.shape != out.shape:
        raise ValueError(f"dout: expected shape {list(out.shape)} (fn's output), got "
                         f"{list(dout.shape)}")
    return dout


def _reference_grads(ref_fn, inputs, wrt, dout, seed):
    """(reference output, dout, autograd's gradients through ref_fn)."""
    ref_name = getattr(ref_fn, "__name__", "reference")
    ref_in = _fresh(inputs, wrt, True)
    ref_out, _, _ = _split_out(ref_fn(*ref_in), ref_name)
    if not ref_out.is_floating_point():
        raise TypeError(f"fn: output is {ref_out.dtype}; expected a floating-point tensor")
    dout = _default_dout(dout, ref_out, seed)
    if not ref_out.requires_grad:
        raise ValueError(f"reference: the output of {ref_name} does not depend on the inputs "
                         f"through autograd (detached, computed under no_grad, or via numpy); "
                         f"expected stock torch ops")
    grads = torch.autograd.grad(ref_out, [ref_in[i] for i in wrt], dout, allow_unused=True)
    return ref_out, dout, [torch.zeros_like(ref_in[i]) if g is None else g
                           for g, i in zip(grads, wrt)]


def _grads_under_test(fn, fn_name, inputs, wrt, backward_fn, dout, names):
    """(fn's output, the gradients under test): the user's backward (no autograd), or autograd
    through fn when backward_fn is None (a custom autograd.Function)."""
    if backward_fn is None:
        test_in = _fresh(inputs, wrt, True)
        out, _, _ = _split_out(fn(*test_in), fn_name)
        grads = torch.autograd.grad(out, [test_in[i] for i in wrt], dout, allow_unused=True)
        return out, [torch.zeros_like(test_in[i]) if g is None else g for g, i in zip(grads, wrt)]
    test_in = _fresh(inputs, wrt, False)
    with torch.no_grad():
        out, cache, has_cache = _split_out(fn(*test_in), fn_name)
        result = backward_fn(dout, cache) if has_cache else backward_fn(dout, *test_in)
    return out, _as_grads(result, len(wrt), names)


def _fd_verdicts(fn, inputs, backward_fn, wrt, names, dout, st, seed):
    """Hand-written backward in float64 vs central differences of sum(fn(inputs)·dout), by the
    one finite-difference rule (refnet.oracles.fd.probe; kinks by the one-sided differences)."""
    x64 = _fresh(inputs, wrt, False, dtype=torch.float64)
    dout64 = dout.detach().to(torch.float64)

    def loss():
        out, _, _ = _split_out(fn(*x64), "fn")
        return float((out.to(torch.float64) * dout64).sum()), None

    with torch.no_grad():
        out, cache, has_cache = _split_out(fn(*x64), "fn")
        analytic = _as_grads(backward_fn(dout64, cache) if has_cache else backward_fn(dout64, *x64),
                             len(wrt), names)
        atol = st.atol_scale * max(1.0, abs(loss()[0]))
        gen = torch.Generator().manual_seed(seed)
        verdicts = []
        for i, nm, a_full in zip(wrt, names, analytic):
            t, name = x64[i], f"{nm} (finite differences)"
            if a_full is None or a_full.shape != t.shape:
                verdicts.append(Verdict(name=name, tier="fail", passed=False, shape=list(t.shape),
                                        dtype="float64", device=str(t.device),
                                        note="the float64 backward returned no gradient or a "
                                             "wrong shape"))
                continue
            flat = t.view(-1)
            idx = sample_indices(flat.numel(), st.per_tensor, gen)
            probed = probe(flat, idx, a_full.detach().to(torch.float64).reshape(-1).cpu(), loss,
                           atol, st)
            verdicts.append(fd_verdict(name, list(t.shape), str(t.device), probed, flat.numel(),
                                       atol, st, f"central differences in float64, h {st.eps:g}"))
    return verdicts
