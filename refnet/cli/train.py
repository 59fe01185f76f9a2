"""`refnet train`: train the manual MLP and its autograd twin in lockstep (refnet.train).

--example NAME trains the example's one net from the registry (refnet.examples): the same spec
`refnet verify --example NAME` checks, with the flags below as overrides.
"""
import argparse
import os
import sys

from refnet import examples
from refnet import train as train_mod
from refnet.checkpoint import check_resume_spec, existing_run_files, load_checkpoint
from refnet.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, positive_int
from refnet.data import load_data
from refnet.settings import apply_threads, largest_gemm_macs, resolve_devices
from refnet.spec import Spec, check_finite


def _nonnegative_float(text):
    """A finite number >= 0 (what a spec's lr accepts; 0 freezes the parameters)."""
    try:
        return check_finite("--lr", float(text), minimum=0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}") from None


FULL_BATCH = "none"  # --batch-size none: override the spec to full batch (batch_size null)


def _batch_size(text):
    if text.strip().lower() == FULL_BATCH:
        return FULL_BATCH
    return positive_int()(text)


def add_parser(sub):
    p = sub.add_parser("train", help="train manual and twin in lockstep, checking agreement as it goes")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--example", metavar="NAME",
                     help=f"an example that trains one MLP: {', '.join(examples.trainable())} "
                          f"(the net `refnet verify --example NAME` checks)")
    src.add_argument("--spec", metavar="FILE.json", help="train the MLP described in this JSON file")
    p.add_argument("--resume", metavar="DIR",
                   help="continue from DIR/checkpoint.pt (or a checkpoint file); outputs go to DIR "
                        "unless --out is given")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="default: auto (cuda if present) for --example, the spec's device for --spec")
    p.add_argument("--dtype", choices=["float32", "float64"], help="default: the spec's (float64)")
    p.add_argument("--steps", type=positive_int(), help="total steps (on --resume: the "
                   "step to continue up to)")
    p.add_argument("--lr", type=_nonnegative_float,
                   help="learning rate >= 0 (overrides the spec's)")
    p.add_argument("--batch-size", type=_batch_size, metavar="B|none",
                   help="mini-batch size (default: the spec's; none means full batch)")
    p.add_argument("--out", metavar="DIR", help="write losses.csv, summary.json, checkpoint.pt "
                   "and plots here (without --out nothing is written, only the summary line is "
                   "printed); refused if DIR already holds a run unless --force")
    p.add_argument("--force", action="store_true",
                   help="let --out overwrite the run already in DIR")
    p.add_argument("--check-every", type=positive_int(), default=50, metavar="K",
                   help="compare parameters and write a checkpoint every K steps (default 50); "
                        "losses are compared at every step")
    p.add_argument("--tier", choices=["bitwise", "ulp", "tolerance"],
                   help="worst agreement allowed before the run stops (default: bitwise on cpu, "
                        "tolerance on cuda or when the spec uses an op listed in "
                        "refnet/not_bitwise.py, e.g. ELU)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar; only the summary line (as verify --quiet)")
    p.add_argument("--threads", type=positive_int(), metavar="N",
                   help="torch CPU threads (default: OMP_NUM_THREADS if set, else 1 unless the "
                        "net's largest GEMM is large; refnet.settings.choose_threads)")
    p.add_argument("--nproc", type=positive_int(), metavar="N", help="data-parallel on N "
                   "processes, manual vs DistributedDataParallel (docs/data-parallel.md)")
    p.set_defaults(func=run)


def _resolve_device(choice):
    return resolve_devices(choice)[0]


def with_overrides(spec, **overrides):
    """A copy of spec with steps/lr/batch_size/device/dtype replaced where given (None: keep);
    full_batch=True sets batch_size to None (full batch)."""
    raw = spec.to_dict()
    lr = overrides.pop("lr", None)
    if lr is not None:
        raw["optimizer"] = {**raw["optimizer"], "lr": lr}
    if overrides.pop("full_batch", False):
        if overrides.get("batch_size") is not None:
            raise ValueError("--batch-size: give a size or none, not both")
        raw["batch_size"] = None
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return Spec.from_dict(raw)


def build_spec(args):
    """The Spec to train and the example name (None for --spec), from args."""
    full_batch = args.batch_size == FULL_BATCH
    overrides = dict(steps=args.steps, lr=args.lr, dtype=args.dtype, full_batch=full_batch,
                     batch_size=None if full_batch else args.batch_size)
    if args.resume:
        if args.example or args.spec:
            raise ValueError("--resume: the checkpoint names what to train; drop --example/--spec")
        ck = load_checkpoint(args.resume)
        base = Spec.from_dict(dict(ck["spec"]))
        device = _resolve_device(args.device) if args.device else base.device
        spec = with_overrides(base, device=device, **overrides)
        check_resume_spec(spec, ck["spec"])   # before any process starts (also for --nproc)
        return spec, ck["example"]
    if args.example:
        device = _resolve_device(args.device or "auto")
        base = examples.get(args.example).build_spec(args.dtype or "float64", device)
        return with_overrides(base, device=device, **overrides), args.example
    if args.spec:
        base = Spec.from_json(args.spec)
        device = _resolve_device(args.device) if args.device else base.device
        return with_overrides(base, device=device, **overrides), None
    raise ValueError("train: give --example NAME, --spec FILE.json or --resume DIR")


def out_folder(args):
    """The folder a run writes to (None: nothing written); refuses to overwrite another run."""
    out = args.out or args.resume
    if out is not None and args.resume and not args.out and not os.path.isdir(args.resume):
        out = os.path.dirname(os.path.abspath(args.resume))
    if args.out and not args.force and not resumes_into(args.resume, args.out):
        existing = existing_run_files(args.out)
        if existing:
            raise ValueError(f"--out: {args.out} already holds a run ({', '.join(existing)}); "
                             f"give --force to overwrite it, or --resume {args.out} to continue it")
    return out


def run(args):
    spec, example = build_spec(args)
    data = examples.get(example).training_data(spec) if example is not None else load_data(spec)
    # the thread policy for this net: its largest GEMM at the training batch size
    batch = spec.batch_size or data[0].shape[0]
    apply_threads(args.threads, largest_gemm_macs(spec.sizes, batch))
    out = out_folder(args)
    summary = train_mod.train(spec, out, check_every=args.check_every, tier=args.tier,
                              resume=args.resume, progress=False if args.quiet else None,
                              example=example, data=data)
    if summary["status"] == "diverged":
        print(f"refnet train: diverged: {summary['divergence']}", file=sys.stderr)
        return EXIT_FAILED
    if summary["status"] == "interrupted":
        print(f"refnet train: {summary['message']}", file=sys.stderr)
        return EXIT_INTERRUPTED
    acc = summary.get("accuracy_manual")
    nonfinite = summary.get("nonfinite")
    print(f"{summary['name']}: {summary['steps']} steps on {summary['device']}/{summary['dtype']}"
          f", loss manual {summary['final_loss_manual']:.6g} twin {summary['final_loss_twin']:.6g}"
          f", tier {summary['tier']} (allowed {summary['allowed_tier']})"
          + (f", accuracy {100 * acc:.1f} %" if acc is not None else "")
          + _step_notes(summary)
          + (f"; {summary['status']}: {nonfinite}" if nonfinite else "")
          + (f"; wrote {', '.join(summary['files'])} in {out}" if out else ""))
    return EXIT_OK


def _step_notes(summary):
    """", clipping active on K of N steps" / ", scaler skipped K steps" when the run has them."""
    notes = ""
    clip = summary.get("clipping")
    if clip:
        notes += f", clipping active on {clip['clipped_steps']} of {clip['steps']} steps"
    scaler = summary.get("grad_scaler")
    if scaler:
        notes += (f", scaler skipped {len(scaler['skipped_steps'])} steps (both sides alike), "
                  f"final scale {scaler['final_scale']:g}")
    return notes


def resumes_into(resume, out):
    """True when --resume targets the folder --out names (continuing a run in place)."""
    if not resume:
        return False
    folder = resume if os.path.isdir(resume) else os.path.dirname(os.path.abspath(resume))
    return os.path.realpath(folder) == os.path.realpath(out)
