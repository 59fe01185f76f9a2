"""Shared pytest set-up for tests/ and verify/.

cuBLAS workspace: set here, before torch is imported, so that the first CUDA matmul of every
process (every xdist worker too) sees it, whether or not a test multiplies outside
refnet.settings.determinism() (refnet/settings.py says why); a value already set is kept.

Threads: refnet.settings.apply_threads, the one thread policy (OMP_NUM_THREADS / MKL_NUM_THREADS
win when set).  The suite's nets are small, so that is one torch thread per process: with torch's
default of one thread per core, N pytest-xdist workers on N cores oversubscribe the machine and
small ops wait for each other (measured: 40x slower on a busy 2-core machine).  Bitwise
comparisons are unaffected: both sides of every comparison run in the same process with the same
thread count.
"""
import os
from importlib import metadata

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# refnet's pytest plugin (refnet_check, --refnet-tier, the summary line; the top-level module
# _refnet_pytestplugin, which imports refnet only when the fixture is used).  When refnet is
# pip-installed its pytest11 entry point already loads it; naming it again here would register
# the plugin twice, so only a plain checkout (nothing installed, or an install older than this
# module) loads it from this file, or a run with entry points switched off
# (PYTEST_DISABLE_PLUGIN_AUTOLOAD).
if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") or not any(
        ep.value == "_refnet_pytestplugin" for ep in metadata.entry_points(group="pytest11")):
    pytest_plugins = ["_refnet_pytestplugin"]

from refnet.settings import apply_threads  # noqa: E402  (after the variable, which must come first)

apply_threads()
