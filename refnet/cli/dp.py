"""`refnet verify|train|bench --nproc N`: the data-parallel verbs (docs/data-parallel.md).

refnet.cli.main sends a parsed command here when --nproc is given or when it runs under torchrun
(TORCHELASTIC_RUN_ID set).  The processes are started by refnet.dp_launch.run_job (spawned here,
or this process is one of torchrun's ranks); this module builds the job from the arguments and
prints rank 0's result as the single-process verbs do.
"""
import json
import os
import sys
import time

from refnet import bench_dp, report
from refnet.atomic import write_text
from refnet.checkpoint import check_world_size, load_checkpoint
from refnet.cli.common import EXIT_FAILED, EXIT_OK, dtypes
from refnet.compare import enforce_expected
from refnet.cli.train import build_spec, out_folder
from refnet.cli.verify import print_row
from refnet.dp_launch import run_job, under_torchrun
from refnet.dp_pair import RankFailed, check_nproc_keys
from refnet.dp_specs import dp_specs
from refnet.spec import Spec


def run_verb(args):
    """The exit code of a data-parallel verb; a failed rank is one line and exit 1."""
    if getattr(args, "threads", None) not in (None, 1):
        raise ValueError(f"--threads: each data-parallel rank runs one torch thread; got "
                         f"{args.threads} (leave --threads out with --nproc)")
    try:
        if args.command == "verify":
            return _verify_verb(args)
        if args.command == "train":
            return _train_verb(args)
        if args.command == "bench":
            return _bench_verb(args)
        raise ValueError(f"{args.command}: does not run data-parallel (only verify, train and "
                         f"bench take --nproc or run under torchrun)")
    except RankFailed as exc:
        print(f"refnet: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _processes(args):
    return args.nproc or os.environ.get("WORLD_SIZE")


def _verify_verb(args):
    if args.example:
        raise ValueError("--example: verify --nproc runs its own data-parallel specs or --spec; "
                         "drop --example")
    both = args.dtype == "all" or (args.dtype is None and not args.spec)
    dtype_names = dtypes("all") if both else [args.dtype] if args.dtype else None
    device = "cuda" if args.device == "cuda" else "cpu"
    if args.spec:
        base = Spec.from_json(args.spec)
        specs = [Spec.from_dict({**base.to_dict(), "dtype": dt, "device": device})
                 for dt in (dtype_names or [base.dtype])]
    else:
        specs = [s for dt in dtype_names for s in dp_specs(dt, device)]
    for spec in specs:
        check_nproc_keys(spec)
    if args.json:
        report.check_writable(args.json)
    started = time.time()
    results = run_job({"mode": "verify", "device": device, "specs": [s.to_dict() for s in specs]},
                      args.nproc)
    if results is None:  # a rank other than 0 under torchrun
        return EXIT_OK
    rows = []
    if not args.quiet:
        print(report.header(), flush=True)
    for spec, (name, dev, dtype, checks) in zip(specs, results):
        # each check's expected tier (refnet.compare.enforce_expected), as `refnet verify` does
        for check in enforce_expected(checks, dev, strict_bits=args.strict_bits):
            r = report.row(name, check, dev, dtype, spec.to_dict())
            rows.append(r)
            if not args.quiet:
                print_row(r)
    s = report.summarize(rows, time.time() - started, args.strict_bits, True)
    if args.json:
        report.write_json({"results": rows, "complete": True, "summary": s}, args.json)
    print(f"{s['passed']}/{s['checks']} checks passed  tiers {s['tiers']}  ({s['seconds']} s, "
          f"torch {s['torch']}, {_processes(args)} processes)")
    return EXIT_OK if s["all_passed"] else EXIT_FAILED


def _train_verb(args):
    spec, example = build_spec(args)
    check_nproc_keys(spec)
    out = out_folder(args)
    if args.resume:  # refuse another N before starting any process
        check_world_size(load_checkpoint(args.resume),
                         args.nproc or int(os.environ.get("WORLD_SIZE", 0)))
    if out:
        os.makedirs(out, exist_ok=True)
    job = {"mode": "train", "device": spec.device, "spec": spec.to_dict(), "example": example,
           "out": out, "resume": args.resume, "check_every": args.check_every, "tier": args.tier}
    summary = run_job(job, args.nproc)
    if summary is None:
        return EXIT_OK
    if summary["status"] == "diverged":
        print(f"refnet train: diverged: {summary['message']}", file=sys.stderr)
        return EXIT_FAILED
    acc = summary.get("accuracy_manual")
    print(f"{summary['name']}: {summary['steps']} steps on {summary['world_size']} processes "
          f"({summary['backend']}) {summary['device']}/{summary['dtype']}, loss manual "
          f"{summary['final_loss_manual']:.6g} DDP twin {summary['final_loss_twin']:.6g}, tier "
          f"{summary['tier']} (allowed {summary['allowed_tier']})"
          + (f", accuracy {100 * acc:.1f} %" if acc is not None else "")
          + (f"; wrote {', '.join(summary['files'])} in {out}" if out else ""))
    return EXIT_OK


def _bench_verb(args):
    """Rows for N = 1 … --nproc spawned here (under torchrun: torchrun's N only), as JSON."""
    device = "cuda" if args.device == "cuda" else "cpu"
    if under_torchrun():
        nprocs = [int(os.environ["WORLD_SIZE"])]
    elif args.nproc:
        nprocs = range(1, args.nproc + 1)
    else:
        raise ValueError("--nproc: give the number of processes for the data-parallel bench")
    rows = bench_dp.bench_dp(nprocs, run_job, device, args.dtype or "float32",
                             steps=5 if args.quick else 20)
    if rows is None:  # a rank other than 0 under torchrun
        return EXIT_OK
    text = json.dumps(rows, indent=2)
    print(text)
    if args.json:
        write_text(args.json, text + "\n")
    return EXIT_OK

