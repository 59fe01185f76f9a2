"""Shared pytest set-up for tests/ and verify/.

Under pytest-xdist each worker is its own process; with torch's default of one intra-op thread
per core, N workers on N cores oversubscribe the machine and small ops spend their time waiting
for each other (measured: 40x slower on a busy 2-core machine).  One torch thread per worker.
Bitwise comparisons are unaffected: both sides of every comparison run in the same process with
the same thread count.
"""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
