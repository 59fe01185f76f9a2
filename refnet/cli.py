"""Command line: `refnet` / `python -m refnet`.

With no arguments it runs the main job (every document example on the default device, a table of
verdicts).  Errors a user can cause print one line and exit 2; failed checks exit 1.
"""
import argparse
import os
import sys

from refnet import report as report_mod
from refnet.settings import default_device, resolve_devices

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own usage dump is noise here)
        raise ValueError(message)


def _dtypes(choice):
    return ["float32", "float64"] if choice == "all" else [choice]


def add_verify(sub):
    p = sub.add_parser("verify", help="run examples (or a spec) on both sides and grade them")
    p.add_argument("--example", nargs="+", metavar="NAME", help="examples to run (default: all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "all"],
                   help="default: cuda if present else cpu (with --spec: the spec's device)")
    p.add_argument("--dtype", choices=["float32", "float64", "all"],
                   help="default: all (with --spec: the spec's dtype)")
    p.add_argument("--spec", metavar="FILE.json", help="verify the MLP described in this JSON file")
    p.add_argument("--strict-bits", action="store_true",
                   help="anything short of bitwise is a failure")
    p.add_argument("--json", metavar="OUT.json", help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.add_argument("--nproc", type=int, metavar="N", help="data-parallel: manual DP vs "
                   "DistributedDataParallel on N processes (docs/data-parallel.md)")
    p.set_defaults(func=cmd_verify)


_notes_shown = set()


def _print_row(r):
    print(report_mod.format_row(r), flush=True)
    # thresholds, kink counts, float64 rebuilds, known non-bitwise ops: each note once per example
    if r.get("note") and (r["example"], r["note"]) not in _notes_shown:
        _notes_shown.add((r["example"], r["note"]))
        print(f"    . {r['note']}", flush=True)
    for msg in r["failures"]:
        print(f"    ! {msg}", flush=True)


def cmd_verify(args):
    from refnet import examples
    from refnet.spec import Spec

    if args.nproc or os.environ.get("TORCHELASTIC_RUN_ID"):  # data-parallel (docs/data-parallel.md)
        from refnet import dp_launch
        return dp_launch.run_verb(args)
    on_row = None if args.quiet else _print_row
    if args.spec:
        if args.example:
            raise ValueError("--spec: give either --spec or --example, not both")
        base = Spec.from_json(args.spec)
        from refnet.harness import load_data
        load_data(base)  # a data/sizes mismatch fails before any output
        devices = resolve_devices(args.device) if args.device else [base.device]
        dtypes = _dtypes(args.dtype) if args.dtype else [base.dtype]
        if "cuda" in devices:
            resolve_devices("cuda")
        run = lambda: run_spec(base, devices, dtypes, args.strict_bits, on_row)  # noqa: E731
    else:
        for name in args.example or []:
            examples.get(name)  # unknown names fail before any output
        devices = resolve_devices(args.device or "auto")
        dtypes = _dtypes(args.dtype or "all")
        run = lambda: report_mod.run(args.example, devices, dtypes, args.strict_bits, on_row)  # noqa: E731
    if args.json:
        report_mod.check_writable(args.json)
    if not args.quiet:
        print(report_mod.header(), flush=True)
    rep = run()
    s = rep["summary"]
    if args.json:
        report_mod.write_json(rep, args.json)
    if not rep["complete"]:
        where = f", partial report in {args.json}" if args.json else ""
        print(f"refnet: interrupted after {s['checks']} checks: INCOMPLETE, not a pass{where}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{s['passed']}/{s['checks']} checks passed  tiers {s['tiers']}  "
          f"({s['seconds']} s, torch {s['torch']}, {s['threads']} threads)")
    return 0 if s["all_passed"] else EXIT_FAILED


def run_spec(base, devices, dtypes, strict_bits, on_row):
    import time
    from refnet.harness import spec_checks
    from refnet.settings import determinism
    from refnet.spec import Spec

    rows, started, complete = [], time.time(), False
    try:
        for device in devices:
            for dtype in dtypes:
                spec = Spec.from_dict({**base.to_dict(), "device": device, "dtype": dtype})
                with determinism(device):
                    for check in spec_checks(spec, strict_bits):
                        r = report_mod.row(spec.name, check, device, dtype)
                        rows.append(r)
                        if on_row:
                            on_row(r)
        complete = True
    except KeyboardInterrupt:
        pass
    return {"results": rows, "complete": complete, "interrupted": not complete,
            "summary": report_mod.summarize(rows, time.time() - started, strict_bits, complete)}


def build_parser():
    parser = _Parser(prog="refnet", description="Manual backprop vs autograd, verified bit for bit.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    add_verify(sub)
    from refnet import cmd_bench, cmd_check_port, cmd_export, cmd_train
    for command in (cmd_train, cmd_export, cmd_check_port, cmd_bench):
        command.add_parser(sub)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv:  # the main job: every document example on the default device
            argv = ["verify", "--device", default_device()]
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return EXIT_USAGE
        return args.func(args)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except (ValueError, TypeError, OSError) as exc:
        print(f"refnet: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("refnet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
