"""Helpers shared by the example modules: the three oracles as Checks.

- ``twin_check``: manual vs autograd twin (bitwise expected on CPU; graded as compare.py says).
- ``doc_check``: manual vs the document's printed numbers, each to the precision it is printed with.
- ``fd_check``: manual vs central finite differences, in float64.
- ``claim_check``: a measured claim of section 9 (holds or not, with the measured numbers).
- ``clipped_run_checks``: a spec's twin checks plus the claim that its clipping acted early only.
"""
import torch

from refnet.compare import (AUTO, CLAIM, ORACLE_AUTOGRAD, ORACLE_DOCUMENT, ORACLE_FINITE_DIFFERENCES,
                            Check, Verdict, compare_tensors, magnitude, required_tier)
from refnet.data import load_data
from refnet.harness import twin_checks
from refnet.oracles import fd

# Central differences in float64 with refnet.oracles.fd's h and rel_error bound (h = 1e-6: truncation O(h²)
# + rounding O(ε/h) ≈ 1e-10 relative on the smooth functions used here); these gradients are O(1),
# so a fixed absolute floor of 1e-8 stands in for fd's 1e-8·max(1, |L|).
FD_EPS, FD_RTOL = fd.FDSettings.eps, fd.FDSettings.rtol
FD_ATOL = fd.FDSettings.atol_scale


def as_tensor(v, ctx):
    return torch.as_tensor(v, dtype=ctx.dtype).to(ctx.device)


def twin_check(name, manual, twin, ctx, kind="grad", note="", expected=AUTO):
    """manual, twin: dicts name -> tensor (same keys).  expected: the tier promised (default: the
    device's, refnet.compare.enforce_expected; an op of refnet.not_bitwise's table states its own)."""
    # gradients: one scale for the tolerance's absolute term, the largest of the group (a
    # mathematically zero gradient is rounding noise of that size; refnet.compare.scaled_atol)
    scale = max(magnitude(t) for t in twin.values()) if kind == "grad" else None
    tier = required_tier(strict_bits=ctx.strict_bits)
    verdicts = [compare_tensors(key, manual[key], twin[key], kind, tier=tier,
                                scale=scale)
                for key in manual]
    return Check(name, verdicts, ORACLE_AUTOGRAD, note, expected=expected)


def doc_check(name, values, expected, note=""):
    """values: name -> tensor; expected: name -> (number or nested list, atol) from the document.

    atol is the precision of the printed number (one unit of its last printed digit; 0 where the
    document's number is exact), plus a float32 rounding allowance when values are float32.
    """
    verdicts = []
    for key, (number, atol) in expected.items():
        got = values[key]
        want = torch.as_tensor(number, dtype=torch.float64)
        slack = 1e-6 * max(1.0, float(want.abs().max())) if got.dtype == torch.float32 else 1e-12
        verdicts.append(compare_tensors(key, got.detach().double().cpu().reshape(want.shape), want,
                                        "forward", rtol=0.0, atol=atol + slack, ulp_limit=0,
                                        tier="tolerance"))
    return Check(name, verdicts, ORACLE_DOCUMENT, note)


def fd_check(name, f, inputs, analytic, indices=None, note=""):
    """f(**inputs) -> tensor whose sum is differentiated; inputs: name -> float64 tensor (perturbed
    in place); analytic: name -> gradient (any dtype, compared in float64).  indices: name -> flat
    indices to sample (default: all)."""
    verdicts = []
    for key, x in inputs.items():
        idx = None if indices is None else indices.get(key)
        num = fd.numeric_gradient(lambda: f(**inputs), x, eps=FD_EPS, indices=idx)
        ana = analytic[key].detach().double()
        if idx is not None:
            flat = torch.as_tensor(list(idx), dtype=torch.long, device=ana.device)
            num, ana = num.reshape(-1)[flat], ana.reshape(-1)[flat]
        verdicts.append(compare_tensors(key, ana.cpu(), num.cpu(), "grad", rtol=FD_RTOL,
                                        atol=FD_ATOL, ulp_limit=0, tier="tolerance"))
    return Check(name, verdicts, ORACLE_FINITE_DIFFERENCES, note)


def sample_indices(numel, k, seed=0):
    """k distinct flat indices (all when numel <= k), seeded."""
    return fd.sample_indices(numel, k, torch.Generator().manual_seed(seed)).tolist()


def claim_check(name, holds, note, figures=None):
    """A measured claim: its own verdict kind, tier "holds" or "does not hold" (never a numerical
    tier), with the measured figures (name -> number) shown in the table and the JSON report."""
    holds = bool(holds)
    v = Verdict(name=name, tier="holds" if holds else "does not hold", passed=holds, note=note)
    return Check(name, [v], CLAIM, note, expected=None, figures=dict(figures or {}))


def named(checks):
    return {c.name: c for c in checks}


def clipped_run_checks(spec, strict_bits):
    """twin_checks of a spec with clip_grad_norm (issue 24's examples), then the claim
    ``clipping_active_early``: the clip scaled the gradients from step 0 and on none of the
    second half's steps; its note lists the clipped steps."""
    x, target = load_data(spec)
    outs = []
    checks = twin_checks(spec, x, target, strict_bits, record=outs)
    clipped = [step for step, out in enumerate(outs) if out.clipped]
    late = [step for step in clipped if step >= len(outs) // 2]
    checks.append(claim_check(
        "clipping_active_early", bool(clipped) and clipped[0] == 0 and not late,
        f"the clip (max_norm {spec.clip_grad_norm['max_norm']}) scaled the gradients on "
        f"{len(clipped)} of {len(outs)} steps ({', '.join(map(str, clipped))}): from step 0, "
        f"none in the second half (both sides' total norms are compared in the loss_curve check)",
        {"clipped_steps": len(clipped), "steps": len(outs), "clipped_late": len(late)}))
    return checks
