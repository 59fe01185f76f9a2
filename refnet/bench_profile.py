"""`refnet bench --profile SIZE`: where one row's step spends its time, op by op, on each side.

For the manual step (FastMLP), the twin (autograd + torch.optim, under torch.autocast for an
autocast row) and the GEMM floor: torch.profiler's self CPU time per ATen op over a few steps
after warm-up, the top ops with their calls and milliseconds per step and their share of the
side's profiled time, and the side's calls per step (refnet.bench.step_calls).  Each step runs
inside one profiler region (``STEP_REGION``), whose self time is what the step spends outside
every op: Python between the calls and their dispatch, which decides the dispatch-bound rows.
"""
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from refnet import bench
from refnet.settings import determinism


# Each step runs inside this region: its self time is the step's time outside every op (Python
# between the calls, the dispatch), so dispatch-bound steps show where their time goes.
STEP_REGION = "step: Python and dispatch between ops"


def _ops(fn, steps, top):
    """(profiled ms per step, [(op, calls per step, ms per step, share)] for the top ops)."""
    with bench.quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function(STEP_REGION):
                fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return total / steps / 1e3, [(e.key, e.count / steps, e.self_cpu_time_total / steps / 1e3,
                                  e.self_cpu_time_total / total) for e in ranked]


def profile_row(name, threads=1, steps=None, top=8, device="cpu", momentum=0.0):
    """The row's per-op profile on each side at ``threads`` torch threads (a JSON-able dict).
    steps: profiled steps (default: two of the row's timing blocks, at least 5)."""
    device = torch.device(device)
    steps = steps or max(5, 2 * bench.SIZES[name]["block"])
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with determinism(device), bench.no_fill():
            sides, fallback = bench.row_sides(name, device, momentum)
            out = {"size": name, "threads": threads, "steps": steps, "manual_fallback": fallback,
                   "sides": {}}
            for side, fn in sides.items():
                for _ in range(2):
                    fn()                                   # warm-up: plans, caches, buffers
                ms, ops = _ops(fn, steps, top)
                out["sides"][side] = {"profiled_ms_per_step": ms, "calls": bench.step_calls(fn),
                                      "ops": ops}
    finally:
        torch.set_num_threads(saved)
    return out


def format_profile(rep):
    """The profile as text: per side its total, calls, and the top ops."""
    lines = [f"profile of {rep['size']} at {rep['threads']} thread(s), {rep['steps']} steps "
             f"(self CPU time per op; share of the side's profiled time)"]
    if rep["manual_fallback"]:
        lines.append(f"  manual falls back: {rep['manual_fallback']}")
    for side, data in rep["sides"].items():
        lines.append(f"{side}: {data['profiled_ms_per_step']:.3f} ms/step profiled, "
                     f"{data['calls']} calls/step")
        for op, calls, ms, share in data["ops"]:
            lines.append(f"  {op:40s} {calls:6.1f} calls {ms:9.3f} ms {100 * share:5.1f}%")
    return "\n".join(lines)
