"""`refnet bench --quick --json`: the report's schema (no timing assertions: speed targets live in
the benchmark's printed ratios, never in unit tests)."""
import json
import os
import subprocess
import sys

import torch

from refnet import bench
from refnet.cli.bench import format_row

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refnet(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "refnet", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bench_quick_json_schema(tmp_path):
    out = tmp_path / "bench.json"
    res = refnet("bench", "--quick", "--no-compile", "--json", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(out.read_text())
    assert isinstance(rep["device"], str) and rep["device"]
    assert isinstance(rep["threads"], int) and rep["threads"] >= 1
    assert [r["size"] for r in rep["rows"]] == list(bench.QUICK_SIZES)
    for r in rep["rows"]:
        assert r["size"] in ("xor", "seed", "medium", "large")
        for key in ("autograd_over_manual", "manual_over_floor"):
            assert isinstance(r[key], float) and r[key] > 0, key
        assert r["compile_over_manual"] is None and "skipped" in r["compile_error"]
        for key in ("manual_peak_bytes", "twin_peak_bytes"):
            assert isinstance(r[key], int) and r[key] > 0, key
        assert r["bitwise"] is True
    assert "xor" in res.stdout and "seed" in res.stdout and "autograd/man" in res.stdout
    assert not list(tmp_path.glob(".refnet-*"))  # no temporary file left behind


def test_bench_usage_errors_are_one_line(tmp_path, capsys):
    from refnet.cli import main
    for args, words in ((["--sizes", "huge"], "--sizes"),
                        (["--quick", "--json", str(tmp_path / "missing" / "x.json")],
                         "folder does not exist"),
                        (["--quick", "--threads", "0"], "--threads"),
                        (["--quick", "--momentum", "1.5"], "--momentum")):
        assert main(["bench", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


def test_peak_bytes_sees_a_step_allocation():
    n = 1 << 16
    def step():
        a = torch.empty(n, dtype=torch.float64)   # 512 KiB, freed at return
        b = torch.empty(n // 2, dtype=torch.float64)
        del a, b
    peak = bench.step_peak_bytes(step, torch.device("cpu"))
    assert peak >= 8 * n + 4 * n and peak < 8 * n + 4 * n + 4096
    t = torch.zeros(10)
    assert bench.held_bytes([t, t[2:], None]) == 40


def test_format_row_reports_compile_failure():
    row = {"size": "xor", "batch": 4, "sizes": [2, 8, 1], "dtype": "float32",
           "median_seconds": {"manual": 1e-4}, "autograd_over_manual": 3.0,
           "compile_over_manual": None, "manual_over_floor": 2.0, "readable_over_manual": 1.5,
           "manual_peak_bytes": 700, "twin_peak_bytes": 800, "bitwise": False,
           "compile_error": "RuntimeError: no compiler"}
    line = format_row(row)
    assert "NO" in line and "no compiler" in line and "3.00" in line


def test_update_table_replaces_only_the_marked_block(tmp_path):
    from refnet.cli.bench import MARK_END, MARK_START, update_table
    row = {"size": "xor", "batch": 4, "sizes": [2, 8, 1], "dtype": "float32",
           "median_seconds": {"manual": 1e-4}, "autograd_over_manual": 3.25,
           "compile_over_manual": None, "manual_over_floor": 2.0, "readable_over_manual": 1.5,
           "manual_peak_bytes": 700, "twin_peak_bytes": 800, "bitwise": True}
    rep = {"rows": [row], "device": "cpu (TEST)", "threads": 2, "torch": "x", "quick": False,
           "seconds": 1.0}
    path = tmp_path / "R.md"
    path.write_text(f"# top\n{MARK_START}\nold table\n{MARK_END}\ntail\n")
    update_table(str(path), rep)
    text = path.read_text()
    assert text.startswith("# top\n") and text.endswith(f"{MARK_END}\ntail\n")
    assert "old table" not in text and "| xor | 4 | 2-8-1 |" in text and "3.25" in text
    path.write_text("no markers\n")
    import pytest
    with pytest.raises(ValueError, match="--table"):
        update_table(str(path), rep)
    assert path.read_text() == "no markers\n"


def test_table_flag_targets_a_docs_page_and_keeps_readme_as_alias():
    from refnet.cli import build_parser
    parser = build_parser()
    for flag in ("--table", "--readme"):
        args = parser.parse_args(["bench", flag, "docs/benchmark.md"])
        assert args.table == "docs/benchmark.md"
    assert parser.parse_args(["bench"]).table is None  # nothing is rewritten unless asked
    text = " ".join(parser._subparsers._group_actions[0].choices["bench"].format_help().split())
    assert "docs/benchmark.md" in text and "README" not in text
