"""An offline GPU machine has torch and pytest, maybe not hypothesis or pytest-xdist (issue 18):
verify/ must still collect every check, skipping only the fuzz tests, with the reason shown."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_verify_collects_without_hypothesis(tmp_path):
    blocker = tmp_path / "hypothesis"            # a package that cannot be imported
    blocker.mkdir()
    (blocker / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'hypothesis'\", name='hypothesis')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}",
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")   # no hypothesis or xdist plugin either
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-rs",
                          "verify/test_fuzz_specs.py", "verify/test_two_layer_seed.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "hypothesis is not installed: spec fuzzing skipped" in text, text
    assert "test_two_layer_seed.py::" in text, text
