"""`refnet verify`: run examples (or a spec) on both sides and grade them (the main job).

The examples and --spec go through one loop, refnet.report.run; each row of the JSON report
carries the spec it ran.
"""
import sys

from refnet import examples, report
from refnet.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, dtypes, positive_int
from refnet.data import load_data
from refnet.settings import apply_threads, default_device, largest_gemm_macs, resolve_devices
from refnet.spec import Spec


def add_parser(sub):
    p = sub.add_parser("verify", help="run examples (or a spec) on both sides and grade them")
    p.add_argument("--example", nargs="+", metavar="NAME", help="examples to run (default: all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "all"],
                   help="default: cuda if present else cpu (with --spec: the spec's device)")
    p.add_argument("--dtype", choices=["float32", "float64", "all"],
                   help="default: all (with --spec: the spec's dtype)")
    p.add_argument("--spec", metavar="FILE.json", help="verify the MLP described in this JSON file")
    p.add_argument("--strict-bits", action="store_true",
                   help="anything short of bitwise is a failure")
    p.add_argument("--allow-tier", choices=["ulp", "tolerance"],
                   help="accept this tier where bitwise is expected (checking your own change to "
                        "manual/; the report says so); default: each check's expected tier")
    p.add_argument("--json", metavar="OUT.json", help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.add_argument("--threads", type=positive_int(), metavar="N",
                   help="torch CPU threads (default: OMP_NUM_THREADS if set, else 1 for the "
                        "document's examples and small specs; refnet.settings.choose_threads)")
    p.add_argument("--nproc", type=positive_int(), metavar="N",
                   help="data-parallel: manual DP vs DistributedDataParallel on N processes "
                        "(docs/data-parallel.md)")
    p.set_defaults(func=run)


def main_job_argv():
    """`refnet` with no arguments: every document example on the default device."""
    return ["verify", "--device", default_device()]


_notes_shown = set()


def print_row(r):
    print(report.format_row(r), flush=True)
    # thresholds, kink counts, float64 rebuilds, known non-bitwise ops: each note once per example
    if r.get("note") and (r["example"], r["note"]) not in _notes_shown:
        _notes_shown.add((r["example"], r["note"]))
        print(f"    . {r['note']}", flush=True)
    for msg in r["failures"]:
        print(f"    ! {msg}", flush=True)


def run(args):
    spec = None
    if args.spec:
        if args.example:
            raise ValueError("--spec: give either --spec or --example, not both")
        spec = Spec.from_json(args.spec)
        x, _ = load_data(spec)  # a data/sizes mismatch fails before any output
        apply_threads(args.threads, largest_gemm_macs(spec.sizes, spec.batch_size or x.shape[0]))
        devices = resolve_devices(args.device) if args.device else [spec.device]
        dtype_names = dtypes(args.dtype) if args.dtype else [spec.dtype]
        if "cuda" in devices:
            resolve_devices("cuda")
    else:
        for name in args.example or []:
            examples.get(name)  # unknown names fail before any output
        devices = resolve_devices(args.device or "auto")
        dtype_names = dtypes(args.dtype or "all")
        apply_threads(args.threads)  # the document's examples are small (largest GEMM 6.4 M)
    if args.json:
        report.check_writable(args.json)
    if not args.quiet:
        print(report.header(), flush=True)
    if args.strict_bits and args.allow_tier:
        raise ValueError("--allow-tier: cannot be combined with --strict-bits")
    rep = report.run(args.example, devices, dtype_names, args.strict_bits,
                     None if args.quiet else print_row, spec=spec, allow_tier=args.allow_tier)
    s = rep["summary"]
    if args.json:
        report.write_json(rep, args.json)
    if not rep["complete"]:
        where = f", partial report in {args.json}" if args.json else ""
        print(f"refnet: interrupted after {s['checks']} checks: INCOMPLETE, not a pass{where}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    relaxed = f"  (expected tiers relaxed to {args.allow_tier})" if args.allow_tier else ""
    claims = f"  claims {s['claims']}" if s["claims"] else ""
    print(f"{s['passed']}/{s['checks']} checks passed  tiers {s['tiers']}{claims}{relaxed}  "
          f"({s['seconds']} s, torch {s['torch']}, {s['threads']} threads)")
    return 0 if s["all_passed"] else EXIT_FAILED
