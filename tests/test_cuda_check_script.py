"""scripts/cuda_check.sh on a machine without a GPU: argument handling, the clean skip, and (with
a stand-in interpreter that claims a device) the listing of what ran, was skipped and failed."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "cuda_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")


def run(*args, python=sys.executable, **env):
    full_env = {**os.environ, "PYTHON": python, "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args", [(), ("a", "b"), ("",), ("--help",)])
def test_bad_arguments_are_a_one_line_usage_error(args):
    out = run(*args)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("usage: scripts/cuda_check.sh OUT_DIR"), out.stderr


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    out = run(str(tmp_path / "f"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"cuda_check: OUT_DIR: {tmp_path / 'f'} exists and is not a folder"


def test_without_a_gpu_it_skips_cleanly(tmp_path):
    out = run(str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert "cuda_check: no CUDA device: skipped" in out.stdout and out.stderr == ""
    assert "no CUDA device: skipped" in (tmp_path / "out" / "checks.txt").read_text()


def test_without_torch_it_says_so(tmp_path):
    out = run(str(tmp_path / "out"), python=str(tmp_path / "no-such-python"))
    assert out.returncode == 2 and "torch is not importable" in out.stderr


def test_with_a_device_it_lists_what_ran_was_skipped_and_failed(tmp_path):
    # A stand-in interpreter: the real one for the script's probes (with torch claiming a GPU),
    # canned results for the checks: pytest passes with one skip, verify fails, the rest pass.
    fake_site = tmp_path / "site"
    fake_site.mkdir()
    (fake_site / "sitecustomize.py").write_text(textwrap.dedent("""\
        import torch
        torch.cuda.is_available = lambda: True
        torch.cuda.get_device_name = lambda *a: "stand-in GPU"
    """))
    fake = tmp_path / "python"
    fake.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        case "$1 $2 $3" in
          "-m pytest "*) echo "SKIPPED [2] verify/test_x.py:9: needs two GPUs"; echo "3 passed"; exit 0 ;;
          "-m refnet verify") echo "1/2 checks passed"; exit 1 ;;
          "-m refnet "*) echo ok; exit 0 ;;
        esac
        PYTHONPATH={fake_site}:$PYTHONPATH exec {sys.executable} "$@"
    """))
    fake.chmod(0o755)
    out = run(str(tmp_path / "out"), python=str(fake), CUDA_VISIBLE_DEVICES="0")
    assert out.returncode == 1, out.stdout + out.stderr
    text = out.stdout
    assert "stand-in GPU" in text
    ran = text.split("ran and passed")[1].split("skipped (")[0]
    skipped = text.split("skipped (")[1].split("failed (")[0]
    failed = text.split("failed (")[1]
    assert "pytest -m cuda: passed" in ran and "refnet train --device cuda: passed" in ran
    assert "refnet bench --device cuda: passed" in ran
    assert "pytest: [2] verify/test_x.py:9: needs two GPUs" in skipped
    assert "torch.compile variant: off unless CUDA_CHECK_COMPILE=1" in skipped
    assert "refnet verify --device cuda: exit 1" in failed
    assert (tmp_path / "out" / "checks.txt").read_text().strip() == text.strip()
    assert {"pytest.log", "verify.log", "train.log", "bench.log"} <= set(os.listdir(tmp_path / "out"))
