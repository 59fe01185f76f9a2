"""refnet's pytest plugin: the `refnet_check` fixture, `--refnet-tier`, and a summary line.

This module is what the fixture does.  pytest loads the plugin itself from the top-level module
`_refnet_pytestplugin` (the `pytest11` entry point when refnet is installed, the repository's own
conftest.py when it is not), which imports this module, and with it refnet and torch, only when a
test first asks for `refnet_check`.  In a test:

    def test_my_backward(refnet_check):
        refnet_check(dx, x_ref.grad, tier="ulp", name="dx")       # assert, graded and strict
        refnet_check.check_backward(affine_forward, [x, w, b], affine_backward)  # asserts too
        refnet_check.trace_compare(manual, reference)              # first departure on failure
        v = refnet_check.compare(a, b)                             # records, does not assert

Every verdict is counted, and the run ends with one line:

    refnet: 12 checks: 11 passed, 1 failed (required bitwise); tiers: bitwise 9, ulp 2, tolerance 1, fail 0

A check that misses its required tier is a failure, whatever its tier (an `ulp` verdict under
`--refnet-tier=bitwise` fails); the tiers are counted beside.

`--refnet-tier=bitwise|ulp|tolerance` replaces the required tier of every refnet_check call in
the run (raise it to see which checks are not bitwise; lower it to let rounding differences pass).
Under pytest-xdist each worker counts its own checks and the controller adds them up.
"""
from refnet import api
from refnet.backward_check import check_backward
from refnet.training_check import check_training


class RefnetCheck:
    """The `refnet_check` fixture: refnet's API, asserting, with every verdict counted."""

    def __init__(self, override, counts):
        self.override = override          # --refnet-tier, or None
        self.counts = counts
        self.verdicts = []                # every verdict of this test, in order

    def tier(self, tier):
        """The required tier of a call: --refnet-tier when given, else the call's, else default."""
        return self.override or api.required_tier(tier)

    def _record(self, verdicts, required):
        """Count each verdict's tier, and whether it met `required` (its failures by tier)."""
        for v in verdicts:
            self.verdicts.append(v)
            self.counts[v.tier] += 1
            self.counts["passed" if v.passed else f"failed@{required}"] += 1

    def __call__(self, actual, expected, *, tier=None, name=None, kind="grad", scale=None):
        """assert_same(actual, expected) at the required tier; returns the Verdict."""
        __tracebackhide__ = True
        required = self.tier(tier)
        verdict = api.compare(actual, expected, name=name, tier=required, kind=kind, scale=scale)
        self._record([verdict], required)
        if not verdict.passed:
            raise AssertionError(api.describe(verdict, required))
        return verdict

    assert_same = __call__

    def compare(self, actual, expected, *, tier=None, name=None, kind="grad", scale=None):
        """refnet.compare, recorded; does not assert."""
        required = self.tier(tier)
        verdict = api.compare(actual, expected, name=name, tier=required, kind=kind, scale=scale)
        self._record([verdict], required)
        return verdict

    def check_backward(self, fn, inputs, backward_fn=None, *, tier=None, **kwargs):
        """refnet.check_backward, recorded; asserts that every gradient meets the tier."""
        __tracebackhide__ = True
        report = check_backward(fn, inputs, backward_fn, tier=self.tier(tier), **kwargs)
        self._record([report.forward, *report], report.required)
        if report.fd is not None:
            self._record(report.fd, report.fd.required)
        return report.assert_ok()

    def trace_compare(self, manual, reference, *, tier=None, scale=None):
        """refnet.trace_compare, recorded; asserts, naming the first intermediate that departs."""
        __tracebackhide__ = True
        trace = api.trace_compare(manual, reference, tier=self.tier(tier), scale=scale)
        self._record(trace.verdicts, trace.verdicts.required)
        return trace.assert_ok()

    def check_training(self, spec, *, tier=None, **kwargs):
        """refnet.check_training, recorded (every checked gradient); asserts it passed."""
        __tracebackhide__ = True
        required = self.tier(tier)
        result = check_training(spec, tier=required, **kwargs)
        self._record([v for _, report in result.grad_checks for v in report], required)
        if not result.passed:
            raise AssertionError(result.message)
        return result

    def record(self, verdicts, required=None):
        """Count verdicts made elsewhere (refnet's own checks; `passed` as each verdict says,
        against `required`, default the run's); returns them."""
        verdicts = list(verdicts)
        self._record(verdicts, self.tier(required))
        return verdicts
