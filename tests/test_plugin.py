"""The pytest plugin: refnet_check, the summary line, --refnet-tier, xdist, one registration
whether it comes from the pytest11 entry point (refnet installed) or the root conftest.py, and no
torch and no CUBLAS_WORKSPACE_CONFIG in a run that never uses the fixture."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import _refnet_pytestplugin as plugin
import refnet.pytest_plugin as fixture_impl
from refnet.api import GRADED
from refnet.compare import TIERS

ROOT = pathlib.Path(__file__).resolve().parents[1]

USER_TESTS = '''
import torch, pytest

def test_bitwise(refnet_check):
    x = torch.arange(6.0)
    refnet_check(x * 2, x + x, tier="bitwise", name="double")

def test_ulp(refnet_check):
    one = torch.tensor([1.0, 2.0])
    refnet_check(torch.nextafter(one, one + 1), one, tier="ulp", name="next")

def test_tolerance_recorded(refnet_check):
    v = refnet_check.compare(torch.tensor([1.0]), torch.tensor([1.00001]), name="near")
    assert v.tier == "tolerance"

def test_fails(refnet_check):
    refnet_check(torch.ones(64), torch.ones(1, 64), name="dbias")
'''


CONFTEST = (ROOT / "conftest.py").read_text(encoding="utf-8")


def fake_install(tmp_path):
    """A dist-info folder declaring refnet's pytest11 entry point: 'refnet is installed'."""
    site = tmp_path / "site"
    info = site / "refnet_entry_point_probe-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: refnet-entry-point-probe\n"
                                   "Version: 0\n")
    (info / "entry_points.txt").write_text("[pytest11]\nrefnet = _refnet_pytestplugin\n")
    return str(site)


def run_pytest(tmp_path, *args, installed=False, env_extra=None):
    """pytest in a fresh folder holding the user's tests and a copy of the repository's root
    conftest.py (its guarded `pytest_plugins` line loads the plugin unless an entry point does)."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "conftest.py").write_text(CONFTEST)
    (work / "test_user.py").write_text(USER_TESTS)
    path = [str(ROOT)] + ([fake_install(tmp_path)] if installed else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    for key in ("PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS", "PYTEST_PLUGINS"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args,
                           str(work)], capture_output=True, text=True, env=env, cwd=work,
                          timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("installed", [True, False], ids=["entry-point", "conftest"])
def test_summary_line_counts_tiers_and_failure_is_refnets_report(tmp_path, installed):
    # loaded by the pytest11 entry point, or (not installed) by the conftest.py line: once
    code, out = run_pytest(tmp_path, installed=installed)
    assert code == 1 and "already registered" not in out, out
    assert ("refnet: 4 checks: 3 passed, 1 failed (required tolerance); tiers: bitwise 1, ulp 1, "
            "tolerance 1, fail 1") in out, out
    assert "3 passed, 1 failed" in out or "1 failed, 3 passed" in out, out
    assert "refnet: dbias is 'fail', required 'tolerance' or better" in out
    assert "shape [64] vs [1, 64]" in out and "never broadcasts" in out


def test_refnet_tier_raises_and_lowers_the_required_tier(tmp_path):
    code, out = run_pytest(tmp_path, "--refnet-tier=bitwise", "-k", "ulp or bitwise")
    assert code == 1 and "refnet: next is 'ulp', required 'bitwise' or better" in out, out
    # the summary counts the check that missed bitwise as a failure, not only by its tier
    assert ("refnet: 2 checks: 1 passed, 1 failed (required bitwise); tiers: bitwise 1, ulp 1, "
            "tolerance 0, fail 0") in out, out
    code, out = run_pytest(tmp_path, "--refnet-tier=tolerance", "-k", "ulp or bitwise")
    assert code == 0, out


@pytest.mark.slow
def test_summary_line_adds_up_xdist_workers(tmp_path):
    code, out = run_pytest(tmp_path, "-n", "2")
    assert code == 1 and ("refnet: 4 checks: 3 passed, 1 failed (required tolerance); tiers: "
                          "bitwise 1, ulp 1, tolerance 1, fail 1") in out, out


def test_repository_run_registers_the_plugin_once(request):
    # in this very run, whichever way it came (entry point or root conftest.py): exactly once
    registered = [p for p in request.config.pluginmanager.get_plugins() if p is plugin]
    assert len(registered) == 1


def test_loaded_by_conftest_when_entry_points_are_off(tmp_path):
    code, out = run_pytest(tmp_path, "-k", "not fails", installed=True,
                           env_extra={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert code == 0 and "already registered" not in out, out
    assert ("refnet: 3 checks: 3 passed, 0 failed; tiers: bitwise 1, ulp 1, tolerance 1, "
            "fail 0") in out, out


def test_refnet_tier_choices():
    import argparse
    parser = argparse.ArgumentParser()

    class Group:
        def addoption(self, *args, **kwargs):
            parser.add_argument(*args, **kwargs)

    plugin.pytest_addoption(type("P", (), {"getgroup": lambda self, name: Group()})())
    assert parser.parse_args(["--refnet-tier", "ulp"]).refnet_tier == "ulp"
    with pytest.raises(SystemExit):
        parser.parse_args(["--refnet-tier", "fail"])


def test_fixture_methods_assert_and_record(refnet_check):
    x = torch.randn(3, 4, dtype=torch.float64)
    before = len(refnet_check.verdicts)
    refnet_check(x.clone(), x, tier="bitwise")
    report = refnet_check.check_backward(torch.tanh, [x], lambda dout, x: dout * (1 - x.tanh() ** 2),
                                         names=["dx"])
    assert report.passed
    trace = refnet_check.trace_compare({"a": x}, {"a": x.clone()})
    assert trace.passed
    assert len(refnet_check.verdicts) == before + 4     # one, forward + dx, one
    # a deliberate failure, on a private counter so this run's summary keeps "fail 0"
    from collections import Counter
    private = fixture_impl.RefnetCheck(None, Counter())
    with pytest.raises(AssertionError, match="first departure at #1 of 1: 'a'"):
        private.trace_compare({"a": x + 1}, {"a": x})
    assert private.counts == Counter({"fail": 1, "failed@tolerance": 1})
    with pytest.raises(AssertionError, match="refnet: g is 'ulp', required 'bitwise'"):
        fixture_impl.RefnetCheck("bitwise", Counter())(torch.nextafter(x, x + 1), x, tier="ulp", name="g")


def test_summary_line_format():
    from collections import Counter
    assert plugin.summary_line(Counter({"bitwise": 2, "fail": 1, "failed@tolerance": 1})) == \
        "refnet: 3 checks: 2 passed, 1 failed (required tolerance); tiers: bitwise 2, ulp 0, " \
        "tolerance 0, fail 1"
    # --refnet-tier=bitwise: 8 checks short of bitwise are 8 failures, though only 2 are `fail`
    counts = Counter({"bitwise": 1, "ulp": 4, "tolerance": 2, "fail": 2, "failed@bitwise": 8})
    assert plugin.summary_line(counts).startswith("refnet: 9 checks: 1 passed, 8 failed (required "
                                                  "bitwise)")
    mixed = Counter({"ulp": 2, "failed@bitwise": 1, "failed@tolerance": 1, "fail": 0})
    assert "0 passed, 2 failed (required bitwise 1, tolerance 1)" in plugin.summary_line(mixed)


def test_tier_names_agree_with_refnets():
    # the plugin names them itself so that loading it imports no refnet
    assert plugin.TIERS == TIERS and plugin.GRADED == GRADED


def test_entry_point_names_the_lazy_module():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'refnet = "_refnet_pytestplugin"' in text
    assert 'py-modules = ["_refnet_pytestplugin"]' in text


UNUSED_TESTS = '''
import os, sys

def test_a_run_without_refnet_check_sees_no_torch():
    assert "torch" not in sys.modules and "refnet" not in sys.modules, "imported at load"
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ, "set at load"

def test_the_fixture_imports_refnet_when_used(refnet_check):
    assert "torch" in sys.modules and "CUBLAS_WORKSPACE_CONFIG" in os.environ
'''


def test_loading_the_plugin_imports_no_torch_and_sets_nothing(tmp_path):
    # an environment with refnet installed: its plugin loaded as the entry point loads it (-p, with
    # autoload off so that an older install of refnet in this venv cannot import it first), in a
    # folder without the repository's conftest.py; the first test runs before any fixture use
    (tmp_path / "test_unused.py").write_text(UNUSED_TESTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    for key in ("CUBLAS_WORKSPACE_CONFIG", "PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS",
                "PYTEST_PLUGINS"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "_refnet_pytestplugin", "-p",
                           "no:cacheprovider", "-p", "no:randomly", "-q", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "2 passed" in out, out
