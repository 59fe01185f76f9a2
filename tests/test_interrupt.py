"""Ctrl-C during `refnet verify` leaves a partial report marked incomplete, never a pass."""
import json
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# `python -m refnet` with one change: after printing its first row, verify waits (up to 10
# minutes) for the signal, so the run cannot finish before the test's SIGINT arrives, however
# loaded the machine is (a plain run of the example raced it: the float64 half finished first).
WAIT_AFTER_FIRST_ROW = """
import sys, time
from refnet import cli
from refnet.cli import verify
real = verify.print_row
def print_row_then_wait(row):
    real(row)
    time.sleep(600)
verify.print_row = print_row_then_wait
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigint_gives_incomplete_report(tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", WAIT_AFTER_FIRST_ROW, "verify", "--example",
                             "two_layer_seed", "--device", "cpu", "--json", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stdout:  # the first finished check, then the child waits in sleep()
            if line.startswith("two_layer_seed"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "INCOMPLETE" in err and "Traceback" not in err
    report = json.loads(out.read_text())
    assert report["complete"] is False and report["interrupted"] is True
    assert report["summary"]["all_passed"] is False and report["summary"]["complete"] is False
    assert len(report["results"]) == 1   # interrupted right after the first check
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_interrupt_during_train_start_up_leaves_no_empty_out(tmp_path, monkeypatch, capsys):
    # Ctrl-C while the run is being set up (before any file is written): one line, exit 130,
    # and the --out folder it had just created is gone again.
    from refnet import cli, harness

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "build_pair", interrupted)
    out = tmp_path / "run"
    assert cli.main(["train", "--example", "xor", "--device", "cpu", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["refnet: interrupted"] and "Traceback" not in err
    assert not out.exists()
    # a folder that existed before the run is left where it was
    out.mkdir()
    assert cli.main(["train", "--example", "xor", "--device", "cpu", "--out", str(out)]) == 130
    assert out.is_dir() and not os.listdir(out)
