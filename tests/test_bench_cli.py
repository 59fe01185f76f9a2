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
    counts = rep["threads"]
    assert counts == sorted({1, bench.machine_threads()}) and all(isinstance(t, int) for t in counts)
    assert [(r["size"], r["threads"]) for r in rep["rows"]] == [
        (size, t) for size in bench.QUICK_SIZES for t in counts]
    for r in rep["rows"]:
        assert r["size"] in bench.SIZES
        for key in ("autograd_over_manual", "manual_over_floor"):
            assert isinstance(r[key], float) and r[key] > 0, key
        assert r["compile_over_manual"] is None and "skipped" in r["compile_error"]
        for key in ("manual_peak_bytes", "twin_peak_bytes", "manual_calls", "twin_calls"):
            assert isinstance(r[key], int) and r[key] > 0, key
        assert r["manual_fallback"] is None
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


def test_step_calls_counts_top_level_ops_once():
    x = torch.ones(4)
    def step():
        torch.mul(x, 2).add_(1)            # 2 top-level calls
        torch._foreach_add_([x, x, x], 1)  # 1, whatever it runs inside
        x.sum()                            # 1
    assert bench.step_calls(step) == 4


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
           "manual_peak_bytes": 700, "twin_peak_bytes": 800, "bitwise": True, "threads": 2}
    rep = {"rows": [row], "device": "cpu (TEST)", "threads": [1, 2], "torch": "x", "quick": False,
           "seconds": 1.0}
    path = tmp_path / "R.md"
    path.write_text(f"# top\n{MARK_START}\nold table\n{MARK_END}\ntail\n")
    update_table(str(path), rep)
    text = path.read_text()
    assert text.startswith("# top\n") and text.endswith(f"{MARK_END}\ntail\n")
    assert "old table" not in text and "| xor | 4 | 2-8-1 | float32 | 2 |" in text and "3.25" in text
    assert "each row at 1 and 2 torch threads" in text
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


def test_classification_rows_have_the_row_schema_and_are_bitwise():
    """spiral_ce (Adam) and mnist_ce (SGD with momentum): ReLU + cross-entropy rows, with the
    optimizer and thread count recorded, the same bits on both sides over the timed steps."""
    import torch
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for size, opt in (("spiral_ce", "adam"), ("mnist_ce", "sgd")):
            r = bench.bench_size(size, "cpu", quick=True, compile_=False)
            cfg = bench.SIZES[size]
            assert (r["size"], r["batch"], r["sizes"], r["loss"], r["activation"], r["dtype"]) == (
                size, cfg["batch"], cfg["sizes"], "cross_entropy", "relu", "float32")
            assert r["optimizer"]["name"] == opt and r["threads"] == 1
            assert r["momentum"] == (0.9 if opt == "sgd" else 0.0)
            for key in ("autograd_over_manual", "manual_over_floor", "readable_over_manual"):
                assert isinstance(r[key], float) and r[key] > 0, key
            for key in ("manual_peak_bytes", "twin_peak_bytes"):
                assert isinstance(r[key], int) and r[key] > 0, key
            assert r["bitwise"] is True, size
    finally:
        torch.set_num_threads(saved)


def test_thread_counts():
    assert bench.thread_counts(3) == [3]
    assert bench.thread_counts(None, "cpu") == sorted({1, bench.machine_threads()})


def test_mnist_bf16_row_runs_bitwise_with_its_fallback_shown(monkeypatch):
    """The autocast row at tiny sizes, 1 and 2 threads: the stock torch.autocast twin against
    FastMLP(autocast="bfloat16"), the same bits over the timed steps, the fallback in the row."""
    import torch
    cfg = dict(bench.SIZES["mnist_bf16"], batch=48, sizes=[20, 12, 5], block=1, reps=(2, 1))
    monkeypatch.setitem(bench.SIZES, "mnist_bf16", cfg)
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            r = bench.bench_size("mnist_bf16", "cpu", quick=True, compile_=False)
            assert (r["autocast"], r["dtype"], r["optimizer"]["name"]) == ("bfloat16", "float32",
                                                                           "adamw")
            assert r["bitwise"] is True, threads
            assert "autocast bfloat16" in r["manual_fallback"]
            for key in ("manual_peak_bytes", "twin_peak_bytes", "manual_calls", "twin_calls"):
                assert isinstance(r[key], int) and r[key] > 0, key
            assert "amp bf16" in format_row(r) and "falls back" in format_row(r)
    finally:
        torch.set_num_threads(saved)


def test_profile_prints_each_side_and_writes_json(tmp_path):
    out = tmp_path / "profile.json"
    res = refnet("bench", "--profile", "xor", "--json", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(out.read_text())
    assert rep["size"] == "xor" and rep["threads"] == 1 and set(rep["sides"]) == {
        "manual", "twin", "floor"}
    for side, data in rep["sides"].items():
        ops = {op for op, _, _, _ in data["ops"]}
        assert data["calls"] > 0 and data["profiled_ms_per_step"] > 0, side
        assert all(0 <= share <= 1 for _, _, _, share in data["ops"]), side
        assert side != "floor" or "aten::addmm" in ops
        assert f"{side}: " in res.stdout
    assert "step: Python and dispatch between ops" in res.stdout
