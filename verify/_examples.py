"""Shared helper for verify/: run one example and index its checks by name."""
from refnet.examples import Context, get
from refnet.settings import determinism


def run(name, device, dtype):
    with determinism(device):
        return {c.name: c for c in get(name).run(Context(device=device, dtype=dtype))}


def assert_all(checks, device, refnet_check=None):
    """Every check passes; on CPU every manual-vs-autograd check is bitwise.

    refnet_check: the plugin's fixture; every verdict is counted in the run's summary line."""
    for c in checks.values():
        if refnet_check is not None:
            refnet_check.record(c.verdicts)
        assert c.passed, f"{c.name}: " + "\n".join(c.failures())
        if device == "cpu" and c.oracle == "manual vs autograd":
            assert c.tier == "bitwise", f"{c.name}: " + "\n".join(v.message() for v in c.verdicts)
