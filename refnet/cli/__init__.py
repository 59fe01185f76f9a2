"""Command line: `refnet` / `python -m refnet`.  One module per verb: verify, train, export,
check_port, bench (each has add_parser(sub) and run(args) -> exit code).

With no arguments it runs the main job (every document example on the default device, a table of
verdicts).  Errors a user can cause print one line and exit 2 (EXIT_USAGE); failed checks exit 1;
Ctrl-C exits 130, also during start-up (one line, never a traceback).
"""
import argparse
import os
import sys

from refnet.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE  # noqa: F401


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own usage dump is noise here)
        raise ValueError(message)


def _verbs():
    # The verb modules load torch (seconds); main() must be running already so that a Ctrl-C
    # during that start-up ends in one line and exit 130.
    # lazy: start-up interrupt handling (see above)
    from refnet.cli import bench, check_port, export, train, verify
    return (verify, train, export, check_port, bench)


def build_parser():
    parser = _Parser(prog="refnet", description="Manual backprop vs autograd, verified bit for bit.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for verb in _verbs():
        verb.add_parser(sub)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
            # the main job: every document example on the default device; options given without
            # a verb (`refnet --quiet`, `refnet --json r.json`) are verify's options for it
            argv = _verbs()[0].main_job_argv() + argv
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        if getattr(args, "nproc", None) or os.environ.get("TORCHELASTIC_RUN_ID"):
            # data-parallel verify/train/bench (docs/data-parallel.md)
            from refnet.cli import dp  # lazy: torch.distributed, loaded as the verbs are (_verbs)
            return dp.run_verb(args)
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
