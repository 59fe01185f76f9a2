"""refnet — a manual-backprop MLP beside its autograd twin, verified example by example."""
import os

# Deterministic cuBLAS needs this before the process's first CUDA matmul, which may come before
# any refnet.settings.determinism() (refnet/settings.py says why); a user's value is kept.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

__version__ = "0.1.0"
