"""verify/: the cross-check suite, parametrized over every available device and both dtypes.

Hypothesis profiles for the spec fuzzing (verify/test_fuzz_specs.py):
  ci        (default) 40 examples, no deadline: fits the CI budget
  thorough  500 examples, no deadline
Choose one with `--hypothesis-profile thorough` or REFNET_HYPOTHESIS_PROFILE=thorough.
hypothesis is optional here: without it (an offline GPU machine with only torch and pytest) the
fuzz tests are skipped with that reason and every other check still runs.
"""
import os

import pytest
import torch

try:  # optional: only verify/test_fuzz_specs.py needs it, and it skips without it
    from hypothesis import HealthCheck, settings
except ImportError:
    settings = None
else:
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("thorough", max_examples=500, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])]
DTYPES = [torch.float32, torch.float64]


def pytest_configure(config):
    # --hypothesis-profile (hypothesis's own option) wins; else the env var; else "ci".
    if settings is not None and not config.getoption("hypothesis_profile", default=None):
        settings.load_profile(os.environ.get("REFNET_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request):
    return request.param
