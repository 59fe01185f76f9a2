"""Central finite differences in float64: the third oracle for every gradient.

`fd_checks(spec)` rebuilds a spec in float64 (same seeded draw of parameters and data), takes the
manual MLP's analytic gradients at init, and compares them with central differences of the loss
on a sample of coordinates of every parameter and of the input (all of them when a tensor has at
most `per_tensor` elements).  It also runs `torch.autograd.gradcheck` on the autograd twin over the
same coordinates.  Thresholds (FDSettings, stated in every report note):

  central difference   (L(θ+h) − L(θ−h)) / 2h with h = 1e-6
  pass                 rel_error ≤ 1e-6 (CS231n: |a − n| / max(|a| + |n|, tiny)), or
                       |a − n| ≤ atol = 1e-8·max(1, |L|) (round-off of L divided by 2h)
  gradcheck            same h; |a − n| ≤ atol + 1e-5·|n|

Kinks.  At ReLU/Leaky ReLU/ELU at 0, Maxout ties (and the SVM hinge) a difference that straddles
the kink means nothing.  A coordinate is at a kink when the piece that a piecewise unit uses
changes between θ−h, θ and θ+h, or when the one-sided differences (L(θ+h) − L(θ))/h and
(L(θ) − L(θ−h))/h disagree (rel_error > 1e-3).  There the analytic value is accepted when it lies
between the two one-sided differences (widened by atol), or else when it equals the central
difference of the loss with every piece frozen as at θ (the derivative of the branch PyTorch's
convention picks at the kink: ReLU'(0) = 0, the first maximal Maxout piece, ...).  Kink
coordinates are counted in the report, with how each was accepted; gradcheck skips them.

One engine, one rule: `probe` (perturb, central difference, kink, accept) and `fd_verdict` (its
Verdict) serve fd_checks (verify), refnet.check_backward(fd=True) and, through `both_sides` and
`numeric_gradient`, the examples.  A caller that cannot name the pieces (check_backward: any
function) finds kinks by the one-sided differences alone and has no frozen-piece fallback.

One module (~300 lines) because it is one oracle: the float64 forward with its kink pieces, the
sampler, the comparison and gradcheck share the same coordinates and thresholds.
"""
from dataclasses import dataclass
import functools

import torch
import torch.nn.functional as F

import manual
from manual.mlp import MLP, init_params
from refnet.compare import (ORACLE_CENTRAL_DIFFERENCES, ORACLE_GRADCHECK, Check, Verdict,
                            ulp_distance, unravel)
from refnet.data import load_data
from refnet.spec import Spec
from refnet.twin import Twin, activation_module, load_params, loss_module


TINY = 1e-300   # rel_error's denominator floor: 0 vs 0 is no error


def rel_error(analytic, numeric):
    a, n = analytic.double(), numeric.double()
    return (a - n).abs() / (a.abs() + n.abs()).clamp_min(TINY)


def both_sides(f, flat, i, eps):
    """(f() at flat[i] + eps, f() at flat[i] - eps); flat[i] is restored."""
    old = flat[i].item()
    flat[i] = old + eps
    plus = f()
    flat[i] = old - eps
    minus = f()
    flat[i] = old
    return plus, minus


def numeric_gradient(f, x, dout=None, eps=1e-6, indices=None):
    """Numerical gradient of sum(f(x) * dout) with respect to x (modified in place, restored).

    f: a function of no arguments that reads x and returns a tensor (or a scalar tensor).
    indices: flat indices of x to perturb (default: all).  Returns a tensor like x with the
    central differences at those indices and NaN elsewhere (no kink rule: see `probe`).
    """
    if x.dtype != torch.float64:
        raise TypeError(f"x: finite differences run in float64, got {x.dtype}")
    flat = x.view(-1)
    grad = torch.full_like(flat, float("nan"))
    for i in range(flat.numel()) if indices is None else indices:
        plus, minus = both_sides(f, flat, int(i), eps)
        diff = plus - minus
        grad[int(i)] = (diff if dout is None else diff * dout).sum() / (2 * eps)
    return grad.view_as(x)


@dataclass
class FDSettings:
    eps: float = 1e-6           # h of the central difference
    rtol: float = 1e-6          # CS231n rel_error bound
    atol_scale: float = 1e-8    # absolute floor: atol = atol_scale * max(1, |L|)
    kink_rtol: float = 1e-3     # one-sided differences further apart than this: a kink
    gradcheck_rtol: float = 1e-5
    per_tensor: int = 64        # coordinates sampled per tensor (all when numel <= per_tensor)
    gradcheck: bool = True

    def describe(self):
        return (f"h {self.eps:g}; pass if rel_error <= {self.rtol:g} or |a-n| <= "
                f"{self.atol_scale:g}*max(1,|L|); gradcheck rtol {self.gradcheck_rtol:g}")


# --- an independent float64 forward that records (and can freeze) the piece of every kinked unit --
def _activation(name, z, spec, piece):
    """(y, piece used) for a hidden activation; piece None for smooth ones."""
    if name in ("relu", "leaky_relu", "elu"):
        mask = (z > 0) if piece is None else piece
        if name == "relu":
            y = torch.where(mask, z, torch.zeros_like(z))
        elif name == "leaky_relu":
            y = torch.where(mask, z, z * spec.slope)
        else:
            y = torch.where(mask, z, spec.alpha * torch.expm1(z))
        return y, mask
    if name == "maxout":
        zz = z.view(z.shape[0], z.shape[1] // spec.k, spec.k)
        idx = zz.max(2).indices if piece is None else piece   # ties: the first maximal piece
        return zz.gather(2, idx.unsqueeze(2)).squeeze(2), idx
    # smooth: sigmoid, tanh, identity, gelu, gelu_tanh, silu (the twin's nn modules, in float64)
    return activation_module(name, spec.slope, spec.alpha, spec.k)(z), None


def _loss(name, out, target, piece):
    if name == "svm":  # nn.MultiMarginLoss(margin=1): mean_n Σ_{j≠y} max(0, 1 − o_y + o_j) / C
        margins = 1 - out.gather(1, target.unsqueeze(1)) + out
        not_target = torch.ones_like(out, dtype=torch.bool).scatter_(1, target.unsqueeze(1), False)
        mask = ((margins > 0) & not_target) if piece is None else piece
        return (torch.where(mask, margins, 0.0).sum(1) / out.shape[1]).mean(), mask
    return loss_module(name)(out, target), None


def _blocks(spec, params, h, used, pieces):
    """The residual blocks in plain torch ops, h + fc2(act(fc1(LN(h)))); each block's activation
    piece is appended to used (after the hidden layers', before the loss's)."""
    b = spec.blocks
    for j in range(b["n"]):
        name = f"blocks.{j}"
        u = h if b["norm"] is None else F.layer_norm(
            h, [h.shape[1]], params[f"{name}.norm.weight"], params[f"{name}.norm.bias"], spec.eps)
        z = F.linear(u, params[f"{name}.fc1.weight"], params[f"{name}.fc1.bias"])
        a, p = _activation(b["activation"], z, spec, None if pieces is None else pieces[len(used)])
        used.append(p)
        h = h + F.linear(a, params[f"{name}.fc2.weight"], params[f"{name}.fc2.bias"])
    return h


def forward_pieces(spec, params, x, target, pieces=None):
    """Loss of the spec's MLP in plain torch ops -> (loss, pieces).  pieces given: frozen.
    pieces: one per hidden activation, then one per block's activation, then the loss's."""
    acts = spec.activations
    n_layers = len(spec.sizes) - 1
    used = []
    h = x
    gen = torch.Generator().manual_seed(spec.seed)  # dropout: the same masks at every evaluation
    with torch.no_grad():
        if spec.embedding is not None:
            h = params["embed.weight"][x].reshape(x.shape[0], -1)
        for i in range(n_layers):
            if i == n_layers - 1 and spec.blocks is not None:
                h = _blocks(spec, params, h, used, pieces)
            h = F.linear(h, params[f"layers.{i}.weight"], params.get(f"layers.{i}.bias"))
            if i < n_layers - 1:
                if spec.norm == "batchnorm":   # training mode: batch statistics, biased variance
                    h = F.batch_norm(h, None, None, params[f"norms.{i}.weight"],
                                     params[f"norms.{i}.bias"], True, 0.0, spec.eps)
                elif spec.norm == "layernorm":
                    h = F.layer_norm(h, [h.shape[1]], params[f"norms.{i}.weight"],
                                     params[f"norms.{i}.bias"], spec.eps)
                h, p = _activation(acts[i], h, spec, None if pieces is None else pieces[i])
                used.append(p)
                if spec.dropout:
                    h = h * torch.empty_like(h).bernoulli_(1 - spec.dropout, generator=gen) \
                        .div_(1 - spec.dropout)
        loss, p = _loss(spec.loss, h, target, None if pieces is None else pieces[-1])
    used.append(p)
    return loss, used


def _same_pieces(a, b):
    """True when every piece of a equals b's (None: pieces not known, or a smooth unit)."""
    return a is None or all(p is None or torch.equal(p, q) for p, q in zip(a, b))


def sample_indices(numel, per_tensor, gen):
    """Sorted distinct flat indices: all of them when numel <= per_tensor, else a seeded sample."""
    if numel <= per_tensor:
        return torch.arange(numel)
    return torch.randperm(numel, generator=gen)[:per_tensor].sort().values


def within(a, n, atol, rtol):
    """The pass rule of one coordinate: |a - n| <= atol, or rel_error(a, n) <= rtol."""
    d = abs(a - n)
    return d <= atol or d <= rtol * max(abs(a) + abs(n), TINY)


@dataclass
class Probed:
    """What `probe` found on the sampled coordinates of one tensor (tensors indexed like idx)."""
    idx: torch.Tensor
    analytic: torch.Tensor     # the analytic values at idx
    numeric: torch.Tensor      # the central difference (the frozen-piece one where it decided)
    ok: torch.Tensor
    bracketed: torch.Tensor    # accepted between the one-sided differences: no single numeric value
    kinks: int
    by_frozen: int
    smooth: list               # (flat index, central difference) of every smooth coordinate


def probe(flat, idx, analytic, loss, atol, st, freeze=False):
    """The one finite-difference rule, on the flat indices `idx` of `flat` (a float64 view,
    perturbed in place and restored); verify, the examples and check_backward all run it.

    loss(): (L, pieces) at the current values.  pieces name the piece every piecewise unit uses
        (None when the caller cannot tell); a change of piece between θ-h, θ and θ+h is a kink.
        With freeze=True, loss(pieces) is L with every piece frozen as given.
    analytic: the analytic gradient, flat, float64 on the CPU.

    Smooth (the pieces hold and the one-sided differences agree to kink_rtol, or to atol): pass
    by `within` against the central difference.  At a kink: pass when the analytic value lies
    between the one-sided differences (widened by atol); else by `within` against the
    frozen-piece central difference when freeze=True; else fail.
    """
    base, base_pieces = loss()
    base = float(base)
    n = len(idx)
    numeric = torch.empty(n, dtype=torch.float64)
    ok = torch.ones(n, dtype=torch.bool)
    bracketed = torch.zeros(n, dtype=torch.bool)
    kinks = by_frozen = 0
    smooth = []
    for j, i in enumerate(idx.tolist()):
        (lp, pp), (lm, pm) = both_sides(loss, flat, i, st.eps)
        lp, lm, a = float(lp), float(lm), float(analytic[i])
        central = (lp - lm) / (2 * st.eps)
        fwd, bwd = (lp - base) / st.eps, (base - lm) / st.eps
        numeric[j] = central
        apart = abs(fwd - bwd) > max(atol, st.kink_rtol * (abs(fwd) + abs(bwd)))
        if not apart and _same_pieces(pp, base_pieces) and _same_pieces(pm, base_pieces):
            ok[j] = within(a, central, atol, st.rtol)
            smooth.append((i, central))
            continue
        kinks += 1
        if min(fwd, bwd) - atol <= a <= max(fwd, bwd) + atol:
            bracketed[j] = True
        elif not freeze:
            ok[j] = False
        else:
            (lpf, _), (lmf, _) = both_sides(functools.partial(loss, base_pieces), flat, i, st.eps)
            numeric[j] = (float(lpf) - float(lmf)) / (2 * st.eps)
            ok[j] = within(a, float(numeric[j]), atol, st.rtol)
            by_frozen += bool(ok[j])
    return Probed(idx, analytic[idx], numeric, ok, bracketed, kinks, by_frozen, smooth)


def fd_verdict(name, shape, device, probed, numel, atol, st, note=""):
    """The Verdict of one tensor's probed coordinates.  Coordinates accepted between the
    one-sided differences have no single numeric value: they stay out of the max diffs."""
    p = probed
    passed = bool(p.ok.all())
    v = Verdict(name=name, tier="tolerance" if passed else "fail", passed=passed, shape=shape,
                dtype="float64", device=device, numel=len(p.idx), mismatched=int((~p.ok).sum()),
                rtol=st.rtol, atol=atol, ulp_limit=None, note="; ".join(filter(None, [
                    f"{len(p.idx)}/{numel} coordinates sampled, {p.kinks} at a kink "
                    f"({int(p.bracketed.sum())} accepted between the one-sided differences, not "
                    f"in the max diffs; {p.by_frozen} by the frozen-piece central difference)",
                    note])))
    measured = ~p.bracketed
    if bool(measured.any()):
        diff = (p.analytic - p.numeric).abs()
        rel = rel_error(p.analytic, p.numeric)
        v.max_abs_diff = float(diff[measured].max())
        v.max_rel_diff = float(rel[measured].max())
        v.max_ulp = float(ulp_distance(p.analytic[measured], p.numeric[measured]).max())
        # the worst coordinate: a failing one if any, else the largest rel_error
        j = int(torch.argmax(torch.where(p.ok, rel, rel + 10.0).masked_fill(p.bracketed, -1.0)))
        v.worst_index = unravel(int(p.idx[j]), shape)
        v.worst_values = [float(p.analytic[j]), float(p.numeric[j])]
    return v


def _float64_setup(spec, data):
    """spec rebuilt in float64, its seeded parameters, the data, and the manual analytic grads."""
    # autocast off: the oracle differentiates the float64 function autocast approximates
    spec64 = spec if spec.dtype == "float64" else Spec.from_dict(
        {**spec.to_dict(), "dtype": "float64", "autocast": None, "grad_scaler": None})
    params = init_params(spec64.sizes, spec64.activation, spec64.bias, scheme=spec64.init,
                         seed=spec64.seed, dtype=torch.float64, device=spec64.device, k=spec64.k,
                         norm=spec64.norm, embedding=spec64.embedding, blocks=spec64.blocks)
    if data is None:
        x, target = load_data(spec64)
    else:
        x, target = data
        x = x.detach().to(torch.float64) if x.is_floating_point() else x.detach()
        if target.is_floating_point():
            target = target.detach().to(torch.float64)
    x = x.clone().contiguous()
    opt = dict(spec64.optimizer)
    mlp = MLP({n: t.clone() for n, t in params.items()}, spec64.activation, spec64.loss,
              manual.make_optimizer(opt.pop("name"), **opt), **spec64.options,
              **spec64.layer_options, generator=torch.Generator().manual_seed(spec64.seed))
    loss, cache = mlp.forward(x, target)
    grads, dx = mlp.backward(cache)
    return spec64, params, x, target, grads, dx, float(loss)


def fd_checks(spec, data=None, settings=None):
    """Checks "finite_diff" (manual vs central differences) and, when enabled, "gradcheck" (twin
    vs torch.autograd.gradcheck), both in float64 at the spec's initial parameters.

    Runs on one intra-op thread (restored after): thousands of tiny forwards are 10-40x faster so
    on a loaded machine, and no bitwise claim rests on these float64 estimates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fd_checks(spec, data, settings)
    finally:
        torch.set_num_threads(threads)


def _fd_checks(spec, data, settings):
    st = settings or FDSettings()
    spec64, params, x, target, grads, dx, loss0 = _float64_setup(spec, data)
    atol = st.atol_scale * max(1.0, abs(loss0))
    gen = torch.Generator().manual_seed(spec64.seed)
    tensors = [(name, params[name], grads[name]) for name in params]
    if x.is_floating_point():  # integer token inputs (embedding) have no gradient
        tensors.append(("input", x, dx))
    loss = functools.partial(forward_pieces, spec64, params, x, target)
    verdicts, smooth_coords = [], []
    kinks = by_bracket = by_frozen = sampled = 0
    for name, t, analytic in tensors:
        flat = t.view(-1)
        idx = sample_indices(flat.numel(), st.per_tensor, gen)
        p = probe(flat, idx, analytic.reshape(-1).cpu(), loss, atol, st, freeze=True)
        smooth_coords += [(name, i, central) for i, central in p.smooth]
        kinks, by_bracket = kinks + p.kinks, by_bracket + int(p.bracketed.sum())
        by_frozen, sampled = by_frozen + p.by_frozen, sampled + len(idx)
        verdicts.append(fd_verdict(f"{name}.grad", list(t.shape), str(t.device), p, flat.numel(),
                                   atol, st))
    rebuilt = "" if spec.dtype == "float64" else f"spec is {spec.dtype}; rebuilt in float64 from the same seed. "
    note = (f"{rebuilt}{sampled} coordinates, {kinks} at a kink ({by_bracket} accepted between "
            f"the one-sided differences, {by_frozen} by the frozen-piece central difference); "
            f"{st.describe()}")
    checks = [Check("finite_diff", verdicts, oracle=ORACLE_CENTRAL_DIFFERENCES, note=note)]
    if st.gradcheck:
        checks.append(_gradcheck(spec64, params, x, target, smooth_coords, atol, st, kinks, rebuilt))
    return checks


def _gradcheck(spec64, params, x, target, coords, atol, st, kinks, rebuilt):
    """torch.autograd.gradcheck on the twin, as a function of the sampled smooth coordinates."""
    twin = Twin(spec64.sizes, spec64.activation, spec64.bias, dtype=torch.float64,
                device=spec64.device, **spec64.options, **spec64.layer_options, seed=spec64.seed)
    load_params(twin, params)
    twin.fixed_masks = True  # the same dropout masks at every evaluation, as the manual gradient
    loss_fn = loss_module(spec64.loss)
    base = {name: p.detach() for name, p in twin.named_parameters()}
    base["input"] = x
    names = sorted({c[0] for c in coords}, key=[*base].index)
    index = {n: torch.tensor([i for m, i, _ in coords if m == n], device=x.device) for n in names}
    values = torch.tensor([base[m].reshape(-1)[i].item() for n in names for m, i, _ in coords
                           if m == n], dtype=torch.float64, device=x.device)
    central = torch.tensor([c for n in names for m, _, c in coords if m == n], dtype=torch.float64)

    def f(v):
        tensors, at = dict(base), 0
        for n in names:
            k = len(index[n])
            tensors[n] = base[n].reshape(-1).index_put((index[n],), v[at:at + k]).view_as(base[n])
            at += k
        xin = tensors.pop("input")
        return loss_fn(torch.func.functional_call(twin, tensors, (xin,)), target)

    note = f"{rebuilt}{len(coords)} smooth coordinates ({kinks} kink coordinates skipped); {st.describe()}"
    v = Verdict(name="twin.grad (gradcheck)", tier="tolerance", passed=True,
                shape=[len(coords)], dtype="float64", device=str(x.device), numel=len(coords),
                rtol=st.gradcheck_rtol, atol=atol, ulp_limit=None, note=note)
    if coords:
        inp = values.clone().requires_grad_(True)
        try:
            torch.autograd.gradcheck(f, (inp,), eps=st.eps, atol=atol, rtol=st.gradcheck_rtol,
                                     raise_exception=True)
        except Exception as exc:  # GradcheckError: keep its first line
            v.tier, v.passed = "fail", False
            v.note = f"gradcheck failed: {str(exc).strip().splitlines()[0]}; " + note
        inp = values.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(f(inp), inp)
        grad = grad.detach().cpu()
        diff = (grad - central).abs()
        v.max_abs_diff = float(diff.max())
        v.max_rel_diff = float(rel_error(grad, central).max())
        v.max_ulp = float(ulp_distance(grad, central).max())
        j = int(torch.argmax(diff))
        v.worst_index = [j]
        v.worst_values = [float(grad[j]), float(central[j])]
        v.mismatched = int((diff > atol + st.gradcheck_rtol * central.abs()).sum())
    return Check("gradcheck", [v], oracle=ORACLE_GRADCHECK, note=note)
