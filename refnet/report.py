"""Run examples (or a user's spec) into a report: rows for a table and the JSON report.

One loop, `run`, serves both `refnet verify --example` and `refnet verify --spec`.  Each row
carries a "spec", as `refnet train`'s summary.json does, so a run can be reproduced from its
report: the user's spec, or the example's one net (refnet.examples; the rows of the comparison
models inside an example, such as xor's linear model, carry the example's net too, which is what
`--example NAME` reproduces), or None for the examples that train no MLP.  Fields: docs/verification.md.
"""
import json
import os
import time

import torch

from refnet import examples
from refnet.atomic import write_text
from refnet.compare import TIERS, count_tiers, enforce_expected, meets
from refnet.harness import spec_checks
from refnet.settings import determinism
from refnet.spec import DTYPES, Spec


def row(example, check, device, dtype, spec=None):
    vs = check.verdicts
    numeric = [v for v in vs if v.numel]
    curves = [v for v in vs if v.steps is not None]
    worst = max(vs, key=lambda v: (v.max_ulp, v.max_abs_diff), default=None)
    return {
        "example": example, "check": check.name, "oracle": check.oracle, "device": device,
        "dtype": dtype, "kind": check.kind, "tier": check.tier, "expected": check.expected,
        "passed": check.passed,
        # a measured claim's figures (kind "claim": tier "holds" / "does not hold")
        "figures": check.figures,
        # measured claims compare no tensors: their numeric columns stay empty ("-"), not 0
        "max_abs_diff": max((v.max_abs_diff for v in numeric), default=None),
        "max_rel_diff": max((v.max_rel_diff for v in numeric), default=None),
        "max_ulp": max((v.max_ulp for v in numeric), default=None),
        "worst_tensor": worst.name if worst is not None and worst.tier != "bitwise" else None,
        "steps": curves[0].steps if curves else None,
        "identical_steps": curves[0].identical_steps if curves else None,
        "first_divergence": curves[0].first_divergence if curves else None,
        "note": _note(check),
        "failures": check.failures(),
        "tensors": [v.to_dict() for v in vs],
        "spec": spec,
    }


def _note(check):
    """The check's note, plus where NaN met NaN at the same positions (agreement, but said)."""
    nan = [f"{v.name} ({v.nan_positions})" for v in check.verdicts if v.nan_positions]
    parts = [check.note] if check.note else []
    if nan:
        parts.append("NaN at the same positions on both sides, counted as agreement: " + ", ".join(nan))
    return "; ".join(parts)


def example_spec(example, device, dtype):
    """The spec `verify --example` reports for an example on (device, dtype): its one net, the
    same spec `train --example` builds (None when the example trains no single MLP)."""
    ex = examples.get(example) if isinstance(example, str) else example
    return ex.build_spec(dtype, device) if ex.spec is not None else None


def _example_jobs(names, devices, dtypes, strict_bits):
    """(name, device, dtype, spec dict or None, checks()) for every example run asked for."""
    todo = [examples.get(n) for n in names] if names else \
        list(examples.document_examples().values())
    for ex in todo:
        for device in devices:
            if device not in ex.devices:
                continue
            for dtype in dtypes:
                if dtype not in ex.dtypes:
                    continue
                ctx = examples.Context(device=device, dtype=DTYPES[dtype], strict_bits=strict_bits)
                spec = example_spec(ex, device, dtype)
                yield (ex.name, device, dtype, spec and spec.to_dict(),
                       lambda ex=ex, ctx=ctx: ex.run(ctx))


def _spec_jobs(base, devices, dtypes, strict_bits):
    """The same for a user's spec, once per (device, dtype)."""
    for device in devices:
        for dtype in dtypes:
            spec = Spec.from_dict({**base.to_dict(), "device": device, "dtype": dtype})
            yield (spec.name, device, dtype, spec.to_dict(),
                   lambda spec=spec: spec_checks(spec, strict_bits))


def run(names=None, devices=("cpu",), dtypes=("float32", "float64"), strict_bits=False,
        on_row=None, spec=None, allow_tier=None):
    """Run the named examples (default: every document example), or with spec= a user's Spec on
    each of devices × dtypes -> report dict.  on_row(row) after each check.

    Ctrl-C (KeyboardInterrupt) stops the run and returns the rows so far in a report marked
    ``"complete": false`` whose summary never claims success.
    """
    jobs = _spec_jobs(spec, devices, dtypes, strict_bits) if spec is not None else \
        _example_jobs(names, devices, dtypes, strict_bits)
    rows, started = [], time.time()
    report = {"results": rows, "summary": {}, "complete": False, "interrupted": False}
    try:
        for name, device, dtype, spec_dict, checks in jobs:
            with determinism(device):
                done = enforce_expected(checks(), device, allow_tier, strict_bits)
            for check in done:
                r = row(name, check, device, dtype, spec_dict)
                rows.append(r)
                if on_row:
                    on_row(r)
        report["complete"] = True
    except KeyboardInterrupt:
        report["interrupted"] = True
    report["summary"] = summarize(rows, time.time() - started, strict_bits, report["complete"],
                                  allow_tier)
    return report


def summarize(rows, seconds, strict_bits=False, complete=True, allow_tier=None):
    tiers = count_tiers(r["tier"] for r in rows if r.get("kind") != "claim")
    claims = count_tiers(r["tier"] for r in rows if r.get("kind") == "claim")
    return {"checks": len(rows), "passed": sum(r["passed"] for r in rows),
            "failed": sum(not r["passed"] for r in rows), "tiers": tiers, "claims": claims,
            "short_of_expected": sum(r.get("expected") in TIERS and r["tier"] in TIERS
                                     and not meets(r["tier"], r["expected"]) for r in rows),
            "all_passed": complete and bool(rows) and all(r["passed"] for r in rows),
            "complete": complete,
            "strict_bits": strict_bits, "allow_tier": allow_tier, "seconds": round(seconds, 2),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


COLUMNS = [("example", 18), ("device", 6), ("dtype", 7), ("check", 33), ("tier", 13),
           ("max_abs_diff", 12), ("max_ulp", 8), ("identical_steps", 15), ("passed", 6)]


def _cell(key, value):
    if value is None:
        return "-"
    if key == "passed":
        return "PASS" if value else "FAIL"
    if key == "max_abs_diff":
        return f"{value:.2e}"
    if key == "max_ulp":
        return "inf" if value == float("inf") else (f"{value:.0f}" if value < 1e6 else f"{value:.1e}")
    return str(value)


def _figure(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def header():
    return "  ".join(name.ljust(w) for name, w in COLUMNS)


def format_row(r):
    if r.get("kind") == "claim":  # no numerical tier: the verdict, then the measured figures
        cells = [_cell(k, r.get(k)).ljust(w) for k, w in COLUMNS[:5]]
        figures = ", ".join(f"{k} {_figure(v)}" for k, v in (r.get("figures") or {}).items())
        return "  ".join(cells + [_cell("passed", r["passed"]).ljust(6), figures]).rstrip()
    cells = []
    for key, w in COLUMNS:
        v = _cell(key, r.get(key))
        if key == "identical_steps" and r.get("steps") is not None:
            v = f"{r['identical_steps']}/{r['steps']}"
        cells.append(v.ljust(w))
    return "  ".join(cells).rstrip()


def check_writable(path):
    """Fail early (before running anything) when the report could not be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--json: folder does not exist: {folder}")
    if os.path.isdir(path):
        raise ValueError(f"--json: {path} is a folder; expected a file name")


def write_json(report, path):
    """Write atomically: a temporary file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--json: folder does not exist: {folder}")
    text = json.dumps(json_safe(report), indent=2, allow_nan=False, default=_json_default) + "\n"
    write_text(path, text)


def _json_default(obj):
    return str(obj)


def json_safe(obj):
    """JSON has no inf/NaN: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return "nan" if obj != obj else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
