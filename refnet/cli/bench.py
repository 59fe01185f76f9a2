"""`refnet bench`: manual vs autograd (and torch.compile, and the GEMM floor), as ratios.

`--table docs/benchmark.md` rewrites the measured table between the markers
`<!-- bench:start -->` and `<!-- bench:end -->` of that page (`--readme` is the old name of the
flag); nothing is rewritten unless asked.
"""
import os
import platform

import torch

from refnet import bench, bench_profile, report
from refnet.atomic import write_text
from refnet.bench import SIZES
from refnet.cli.common import EXIT_FAILED, EXIT_OK, positive_int
from refnet.settings import resolve_devices

MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"
DOCS_PAGE = "docs/benchmark.md"


def add_parser(sub):
    p = sub.add_parser("bench", help="time a training step: manual vs autograd vs compile vs the "
                                     "GEMM floor, and peak memory")
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), metavar="SIZE",
                   help=f"sizes to run, among {', '.join(SIZES)} (default: all; --quick: xor seed)")
    p.add_argument("--quick", action="store_true",
                   help="short grid and few repeats (CI smoke test)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="cuda times with CUDA events and also runs the captured CUDA graph")
    p.add_argument("--dtype", choices=["float32", "float64"],
                   help="one dtype for every size (default: float64 for seed, float32 otherwise)")
    p.add_argument("--threads", type=positive_int(), metavar="N",
                   help="torch CPU threads for every row (default: each row at 1 thread and at "
                        "the machine's count)")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--json", metavar="OUT.json", help="write the results here")
    p.add_argument("--table", "--readme", dest="table", metavar="FILE.md",
                   help=f"replace the table between {MARK_START} and {MARK_END} in this file "
                        f"(the documented one: {DOCS_PAGE}; --readme is an alias)")
    p.add_argument("--profile", choices=list(SIZES), metavar="SIZE",
                   help="instead of timing: the per-op profile of one size's step on each side "
                        "(manual, twin, floor; top ops, their share of the side's time, calls per "
                        "step) at --threads (default 1); --json writes it")
    p.add_argument("--nproc", type=positive_int(), metavar="N",
                   help="data-parallel bench: manual DP vs DDP step time and peak memory for "
                        "1..N processes (refnet/bench_dp.py, docs/data-parallel.md)")
    p.set_defaults(func=run)


def _command_line(args):
    """The bench command that produced a table (output paths left out), for the table's header."""
    parts = ["refnet bench"]
    if args.quick:
        parts.append("--quick")
    if args.sizes:
        parts.append("--sizes " + " ".join(args.sizes))
    for flag, value in (("--device", args.device if args.device not in (None, "auto", "cpu") else None),
                        ("--dtype", args.dtype), ("--threads", args.threads),
                        ("--momentum", args.momentum or None)):
        if value is not None:
            parts.append(f"{flag} {value}")
    if args.no_compile:
        parts.append("--no-compile")
    return " ".join(parts)


def markdown(rep):
    """The measured table as Markdown, with the machine and settings it was measured on."""
    cmd = rep.get("command") or ("refnet bench" + (" --quick" if rep["quick"] else ""))
    threads = " and ".join(map(str, rep["threads"]))
    lines = [f"Measured with `{cmd}` on {rep['device']}, "
             f"each row at {threads} torch threads ({os.cpu_count()} CPUs seen), torch {rep['torch']}, "
             f"Python {platform.python_version()}; {rep['seconds']} s in all.  Medians of "
             f"interleaved samples; ratios above 1 mean the manual step is faster.", "",
             "| size | batch | layers | dtype | threads | manual ms/step | autograd/manual "
             "| compile/manual | manual/floor | readable/manual | peak manual | peak twin "
             "| calls manual/twin | bitwise |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rep["rows"]:
        lines.append(
            f"| {r['size']} | {r['batch']} | {'-'.join(map(str, r['sizes']))} | {_dtype(r)} "
            f"| {r['threads']} | {r['median_seconds']['manual'] * 1e3:.3f} | {_ratio(r['autograd_over_manual'])} "
            f"| {_ratio(r['compile_over_manual'])} | {_ratio(r['manual_over_floor'])} "
            f"| {_ratio(r['readable_over_manual'])} | {_mib(r['manual_peak_bytes'])} "
            f"| {_mib(r['twin_peak_bytes'])} | {_calls(r)} | {'yes' if r['bitwise'] else 'no'} |")
    fallbacks = {r["size"]: r["manual_fallback"] for r in rep["rows"] if r.get("manual_fallback")}
    if fallbacks:
        lines.append("")
        lines += [f"`{size}`: the manual step falls back: {why}." for size, why in fallbacks.items()]
    return "\n".join(lines) + "\n"


def update_table(path, rep):
    """Replace the text between the markers in the page at path (e.g. docs/benchmark.md),
    atomically (temp file in the folder + rename)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.count(MARK_START) != 1 or text.count(MARK_END) != 1 \
            or text.index(MARK_START) > text.index(MARK_END):
        raise ValueError(f"--table: expected one {MARK_START} … {MARK_END} block in {path}")
    head, rest = text.split(MARK_START)
    _, tail = rest.split(MARK_END)
    write_text(path, head + MARK_START + "\n" + markdown(rep) + MARK_END + tail)


def _dtype(r):
    """The row's dtype; an autocast row's as float32 + the autocast dtype (amp bf16 / amp f16)."""
    amp = r.get("autocast")
    return r["dtype"] if not amp else f"amp {'bf16' if amp == 'bfloat16' else 'f16'}"


def _mib(n):
    if n < 10 * 2**10:
        return f"{n} B"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _calls(r):
    return f"{r['manual_calls']}/{r['twin_calls']}" if "manual_calls" in r else "-"


def _ratio(v):
    return "-" if v is None else f"{v:.2f}"


HEADER = (f"{'size':10s} {'batch':>5s} {'layers':16s} {'dtype':8s} {'thr':>3s} {'manual ms':>9s} "
          f"{'autograd/man':>12s} {'compile/man':>11s} {'man/floor':>9s} {'readable/man':>12s} "
          f"{'peak man':>11s} {'peak twin':>11s} {'calls m/t':>9s} bitwise")


def format_row(r):
    layers = "-".join(map(str, r["sizes"]))
    line = (f"{r['size']:10s} {r['batch']:5d} {layers:16s} {_dtype(r):8s} {r.get('threads', 0):3d} "
            f"{r['median_seconds']['manual'] * 1e3:9.3f} {_ratio(r['autograd_over_manual']):>12s} "
            f"{_ratio(r['compile_over_manual']):>11s} {_ratio(r['manual_over_floor']):>9s} "
            f"{_ratio(r['readable_over_manual']):>12s} {_mib(r['manual_peak_bytes']):>11s} "
            f"{_mib(r['twin_peak_bytes']):>11s} {_calls(r):>9s} {'yes' if r['bitwise'] else 'NO'}")
    if r.get("manual_fallback"):
        line += f"  (manual falls back: {r['manual_fallback']})"
    if r.get("graph_over_manual") is not None:
        line += f"  graph/man {r['graph_over_manual']:.2f}"
    if r["compile_over_manual"] is None and r.get("compile_error") \
            and not r["compile_error"].startswith("skipped"):
        line += f"  (compile: {r['compile_error']})"
    return line


def run(args):
    device = resolve_devices(args.device)[0]
    if not 0.0 <= args.momentum < 1.0:
        raise ValueError(f"--momentum: expected a number in [0, 1), got {args.momentum}")
    if args.json:
        report.check_writable(args.json)
    if args.table:
        if not os.path.isfile(args.table):
            raise ValueError(f"--table: file not found: {args.table}")
        with open(args.table, encoding="utf-8") as f:
            if f.read().count(MARK_START) != 1:
                raise ValueError(f"--table: expected one {MARK_START} … {MARK_END} block in "
                                 f"{args.table}")
    if args.profile:
        rep = bench_profile.profile_row(args.profile, threads=args.threads or 1, device=device,
                                        momentum=args.momentum)
        print(bench_profile.format_profile(rep))
        if args.json:
            report.write_json(rep, args.json)
        return EXIT_OK
    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(HEADER, flush=True)
    rep = bench.run(args.sizes, device, dtype, quick=args.quick, compile_=not args.no_compile,
                    momentum=args.momentum, threads=args.threads,
                    on_row=lambda r: print(format_row(r), flush=True))
    print(f"device {rep['device']}, rows at {'/'.join(map(str, rep['threads']))} threads, "
          f"torch {rep['torch']}, "
          f"{rep['seconds']} s; medians of interleaved samples; ratios > 1 mean manual is faster "
          f"(man/floor: < 1.10 is near the GEMM floor)")
    rep["command"] = _command_line(args)
    if args.json:
        report.write_json(rep, args.json)
    if args.table:
        update_table(args.table, rep)
    return EXIT_OK if all(r["bitwise"] for r in rep["rows"]) or device != "cpu" else EXIT_FAILED
