"""refnet's pytest plugin as pytest loads it: hooks and the `refnet_check` fixture, without refnet.

The `pytest11` entry point (and, in a plain checkout, the root conftest.py) names this module, not
the `refnet` package: importing anything under `refnet` runs `refnet/__init__.py`, which imports
torch and sets CUBLAS_WORKSPACE_CONFIG, and a plugin is loaded by every pytest run of an
environment where refnet is installed.  As Hypothesis does with its `_hypothesis_pytestplugin`,
the plugin is a top-level module that imports only pytest; refnet (so torch, so the variable) is
imported the first time a test asks for `refnet_check`.  Runs that never use the fixture see no
torch and no variable (tests/test_plugin.py holds this).

What the fixture does is in refnet/pytest_plugin.py (RefnetCheck, and its docstring).
"""
from collections import Counter

import pytest

# refnet.compare.TIERS, best first, and the three a check may require (refnet.api.GRADED): named
# here so that the option and the summary need no refnet import; tests/test_plugin.py checks that
# they agree with refnet's.
TIERS = ("bitwise", "ulp", "tolerance", "fail")
GRADED = TIERS[:-1]

_COUNTS = pytest.StashKey[Counter]()


def pytest_addoption(parser):
    group = parser.getgroup("refnet")
    group.addoption("--refnet-tier", choices=GRADED, default=None,
                    help="required tier for every refnet_check in this run (default: each "
                         "call's own tier, else 'tolerance')")


def pytest_configure(config):
    config.stash[_COUNTS] = Counter()


def _counts(config):
    return config.stash.setdefault(_COUNTS, Counter())


@pytest.fixture
def refnet_check(request):
    """Graded, strict tensor checks (refnet.assert_same and friends); counted for the summary."""
    # lazy: refnet imports torch and sets CUBLAS_WORKSPACE_CONFIG; only a test using refnet pays
    from refnet.pytest_plugin import RefnetCheck
    return RefnetCheck(request.config.getoption("refnet_tier"), _counts(request.config))


def summary_line(counts):
    """refnet: N checks: P passed, F failed (required T); tiers: ...  A failure is a check that
    missed its required tier (counted under "failed@<tier>"), whatever tier it reached."""
    total = sum(counts[t] for t in TIERS)
    failed = {t: counts[f"failed@{t}"] for t in GRADED if counts[f"failed@{t}"]}
    required = ", ".join(f"{t} {n}" for t, n in failed.items()) if len(failed) > 1 else \
        next(iter(failed), "")
    return (f"refnet: {total} checks: {total - sum(failed.values())} passed, "
            f"{sum(failed.values())} failed" + (f" (required {required})" if failed else "")
            + "; tiers: " + ", ".join(f"{t} {counts[t]}" for t in TIERS))


def pytest_sessionfinish(session):
    # an xdist worker sends its counts to the controller
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["refnet_counts"] = dict(_counts(session.config))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    counts = getattr(node, "workeroutput", {}).get("refnet_counts", {})
    _counts(node.config).update(counts)


def pytest_terminal_summary(terminalreporter, config):
    counts = _counts(config)
    if sum(counts.values()) and getattr(config, "workeroutput", None) is None:
        terminalreporter.write_line(summary_line(counts))
