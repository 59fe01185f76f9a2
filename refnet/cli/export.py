"""`refnet export --out DIR`: golden fixtures for ports (format: refnet/fixtures.py, docs/porting.md)."""
import os

from refnet import examples
from refnet.cli.common import EXIT_OK, dtypes
from refnet.fixtures import case_for_spec, export
from refnet.spec import Spec


def add_parser(sub):
    p = sub.add_parser("export", help="write golden fixtures (every intermediate) for ports")
    p.add_argument("--out", required=True, metavar="DIR", help="fixture directory to create")
    p.add_argument("--example", nargs="+", metavar="NAME",
                   help="examples to export: any that trains one MLP (default: the examples "
                        "that provide a case of their own, except makemore_ninja and "
                        "fc_norm_dropout (200-400 kB each); none when "
                        "--spec is given)")
    p.add_argument("--spec", metavar="FILE.json", help="also export the MLP described in this file")
    p.add_argument("--dtype", choices=["float32", "float64", "all"],
                   help="default: all for examples, the spec's own dtype for --spec")
    p.add_argument("--steps", type=int, metavar="N",
                   help="length of the training run (default: 8 for examples, the spec's steps)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    p.set_defaults(func=run)


def cases_for(example_names, spec_path, dtype_choice, steps=None):
    """[(case name, case dict)] for the requested examples and spec."""
    if steps is not None and steps < 1:
        raise ValueError(f"--steps: expected an integer >= 1, got {steps}")
    dtype_names = dtypes("all" if dtype_choice is None else dtype_choice)
    if example_names is None:
        example_names = [] if spec_path else [n for n, e in examples.all_examples().items()
                                              if e.case and e.export_default]
    cases = []
    for name in example_names:
        ex = examples.get(name)
        if ex.case is None and ex.spec is None:
            exportable = (n for n, e in examples.all_examples().items() if e.case or e.spec)
            raise ValueError(f"--example: {name!r} provides no exportable case (not an MLP run); "
                             f"exportable: {', '.join(exportable)}")
        case = ex.case or (lambda dt, n=None, ex=ex: _spec_case(ex, dt, n))
        for dt in dtype_names:
            if dt in ex.dtypes:
                cases.append((f"{name}.{dt}", case(dt, steps) if steps else case(dt)))
    if spec_path:
        base = Spec.from_json(spec_path)
        for dt in dtype_names if dtype_choice else [base.dtype]:
            over = {"dtype": dt, "device": "cpu", **({"steps": steps} if steps else {})}
            cases.append((f"{base.name}.{dt}", case_for_spec(Spec.from_dict({**base.to_dict(), **over}))))
    if not cases:
        raise ValueError("--example: nothing to export")
    return cases


def _spec_case(ex, dtype, steps=None):
    """The case of an example that is one spec (and gives no case of its own): its net, data and
    start on the CPU, its own number of steps unless --steps cuts it."""
    spec = ex.build_spec(dtype, "cpu")
    if steps is not None:
        spec = Spec.from_dict({**spec.to_dict(), "steps": steps})
    return case_for_spec(spec, ex.initial_params(spec), ex.training_data(spec),
                         note=f"the example's spec, {spec.steps} training steps")


def run(args):
    manifest = export(args.out, cases_for(args.example, args.spec, args.dtype, args.steps), args.force)
    for case in manifest["cases"]:
        print(f"{case['file']:<40} {len(case['tensors']):>3} tensors {case['bytes']:>10} bytes  "
              f"steps {case['steps']}")
    print(f"wrote {len(manifest['cases'])} case(s) to {os.path.abspath(args.out)}")
    return EXIT_OK
