"""Ctrl-C during `refnet verify` leaves a partial report marked incomplete, never a pass."""
import json
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigint_gives_incomplete_report(tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "refnet", "verify", "--example", "two_layer_seed",
                             "--device", "cpu", "--json", str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # wait for the first finished check (float32), then interrupt during the float64 run
        for line in proc.stdout:
            if line.startswith("two_layer_seed"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "INCOMPLETE" in err and "Traceback" not in err
    report = json.loads(out.read_text())
    assert report["complete"] is False and report["interrupted"] is True
    assert report["summary"]["all_passed"] is False and report["summary"]["complete"] is False
    assert 1 <= len(report["results"]) < 7
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
