"""`refnet check-port DIR`: compare a port's outputs with the golden fixtures, tensor by tensor."""
import json
import os

from refnet.cli.common import EXIT_FAILED, EXIT_OK
from refnet.fixtures import MANIFEST
from refnet.portcheck import check_port, summary


def add_parser(sub):
    p = sub.add_parser("check-port", help="compare a port's output directory with golden fixtures")
    p.add_argument("dir", metavar="DIR", help="the port's output directory (same file names)")
    p.add_argument("--fixtures", metavar="FIXTURES",
                   help="fixture directory (default: the 'fixtures' entry of DIR/manifest.json)")
    p.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    p.set_defaults(func=run)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def run(args):
    if not os.path.isdir(args.dir):
        raise ValueError(f"DIR: not a directory: {args.dir} (expected the port's output folder)")
    fixtures = args.fixtures
    if fixtures is None:
        path = os.path.join(args.dir, MANIFEST)
        try:
            with open(path, encoding="utf-8") as f:
                fixtures = json.load(f).get("fixtures")
        except (OSError, ValueError, AttributeError):
            fixtures = None
        if not fixtures:
            raise ValueError(f"--fixtures: not given and {path} names no 'fixtures' directory")
        if not os.path.isabs(fixtures):
            fixtures = os.path.join(args.dir, fixtures)
    rows = check_port(args.dir, fixtures)
    case = None
    for r in rows:
        if not args.quiet or not r["passed"]:
            if r["case"] != case:
                case = r["case"]
                print(f"\n{case}\n  {'tensor':<44} {'tier':<10} {'max abs diff':>12} {'max ulp':>9} {'of tol':>7}")
            print(f"  {r['name']:<44} {r['tier']:<10} {_fmt(r['max_abs_diff'], '12.3g')} "
                  f"{_fmt(r['max_ulp'], '9.4g')} {_fmt(r['tolerance_used'], '7.2%')}")
            if r["note"]:
                print(f"    ! {r['note']}")
    s = summary(rows)
    print()
    differs, fails = s["first_differs"], s["first_fails"]
    if differs is None:
        print("your port matches the fixtures bit for bit")
    else:
        print(f"your port first differs at {differs['case']}/{differs['name']} ({differs['tier']})")
    if fails is not None:
        print(f"your port first fails at {fails['case']}/{fails['name']}")
    print(f"{s['passed']}/{s['tensors']} tensors pass  tiers {s['tiers']}")
    return EXIT_OK if fails is None and rows else EXIT_FAILED
