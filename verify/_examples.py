"""Shared helper for verify/: run one example and index its checks by name."""
from refnet.compare import ORACLE_AUTOGRAD, enforce_expected, meets
from refnet.examples import Context, get
from refnet.settings import determinism


def run(name, device, dtype):
    """The example's checks, each with its expected tier resolved (refnet.compare.enforce_expected:
    falling short of it fails the check, as in the main job)."""
    with determinism(device):
        checks = get(name).run(Context(device=device, dtype=dtype))
    return {c.name: c for c in enforce_expected(checks, device)}


def assert_all(checks, device, refnet_check=None):
    """Every check passes, which includes reaching its expected tier (bitwise on CPU for a
    manual-vs-autograd check unless refnet.not_bitwise's table states the op's bound).

    refnet_check: the plugin's fixture; every verdict is counted in the run's summary line."""
    for c in checks.values():
        if refnet_check is not None:
            refnet_check.record(c.verdicts)
        assert c.passed, f"{c.name}: " + "\n".join(c.failures())
        if c.oracle == ORACLE_AUTOGRAD:
            assert c.expected is not None and meets(c.tier, c.expected), \
                f"{c.name}: tier {c.tier}, expected {c.expected}"
