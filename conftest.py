"""Shared pytest set-up for tests/ and verify/.

Under pytest-xdist each worker is its own process; with torch's default of one intra-op thread
per core, N workers on N cores oversubscribe the machine and small ops spend their time waiting
for each other (measured: 40x slower on a busy 2-core machine).  One torch thread per worker.
Bitwise comparisons are unaffected: both sides of every comparison run in the same process with
the same thread count.
"""
import os
from importlib import metadata

import torch

# refnet's pytest plugin (refnet_check, --refnet-tier, the summary line).  When refnet is
# pip-installed its pytest11 entry point already loads it; naming it again here would register
# the plugin twice, so only a plain checkout (nothing installed) loads it from this file, or a run
# with entry points switched off (PYTEST_DISABLE_PLUGIN_AUTOLOAD).
if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") or not any(
        ep.value == "refnet.pytest_plugin" for ep in metadata.entry_points(group="pytest11")):
    pytest_plugins = ["refnet.pytest_plugin"]

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
