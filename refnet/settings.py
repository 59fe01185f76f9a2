"""Numerical settings under which manual and twin are compared, device resolution, and the thread
policy.

cuBLAS workspace: deterministic cuBLAS GEMMs need ``CUBLAS_WORKSPACE_CONFIG`` (":4096:8"), and
CUDA reads it once, when the process's first cuBLAS handle is made, then keeps that answer.  So it
is set when the package is imported (refnet/__init__.py, before torch touches CUDA; a value the
user already set is kept) and by the root conftest.py for the tests, and never unset.
``determinism()`` sets it too, as a fallback that only helps when no cuBLAS handle exists yet: for
a process that multiplied on the GPU before, that would be too late.  A program that runs a CUDA matmul before importing refnet must
set the variable itself.
"""
from contextlib import contextmanager
import os
import warnings

import torch

CUBLAS_WORKSPACE = ":4096:8"

# At or above this many multiply-adds in the step's largest GEMM (batch × in × out) the step gets
# every CPU; below it, one thread.  Measured on the shared 2-core machine with another job on the
# other core (torch 2.13 CPU): the two_layer_seed example (64×1000×100 = 6.4 M) took 22 s at one
# thread and 562 s at two; bench "large" (1024×2048×2048 = 4.3 G) took 1.39 s/step at one thread
# and 4.39 s/step at two.  So a busy machine never gains; an idle one with more cores does once a
# GEMM runs for tens of milliseconds, which is where this threshold sits (bench "large" and up).
THREADED_GEMM_MACS = 1 << 30   # 1.07 G
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")   # the order torch reads them in


def cuda_available():
    return torch.cuda.is_available()


def default_device():
    return "cuda" if cuda_available() else "cpu"


def resolve_devices(choice):
    """'cpu' | 'cuda' | 'all' | 'auto' -> list of device names; cuda without a GPU is an error."""
    if choice in (None, "auto"):
        return [default_device()]
    if choice == "all":
        return ["cpu"] + (["cuda"] if cuda_available() else [])
    if choice == "cpu":
        return ["cpu"]
    if choice == "cuda":
        if not cuda_available():
            raise ValueError("--device: cuda requested but torch sees no CUDA device")
        return ["cuda"]
    raise ValueError(f"--device: expected cpu, cuda, all or auto, got {choice!r}")


# -- threads -----------------------------------------------------------------------------------
def largest_gemm_macs(sizes, batch):
    """Multiply-adds of the largest GEMM in a training step of an MLP (batch × in × out)."""
    return max(batch * a * b for a, b in zip(sizes[:-1], sizes[1:]))


def cpus():
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _env_threads():
    """The thread count the environment asks for (OMP_NUM_THREADS, then MKL_NUM_THREADS), or None."""
    for var in THREAD_ENV_VARS:
        text = os.environ.get(var, "").strip()
        if text:
            try:
                value = int(text)
            except ValueError:
                continue       # torch ignores a malformed value too
            if value >= 1:
                return value
    return None


def choose_threads(requested=None, gemm_macs=None):
    """The torch CPU thread count for a workload: the one place that decides it.

    requested (--threads N) wins; else OMP_NUM_THREADS / MKL_NUM_THREADS if set; else one thread
    unless the step's largest GEMM has at least THREADED_GEMM_MACS multiply-adds (gemm_macs, see
    largest_gemm_macs; None: a small workload such as the document's examples), then every CPU
    this process may run on.  float32 bits of large GEMMs depend on the count, so reports and
    fixtures record the count used.
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"--threads: expected an integer >= 1, got {requested!r}")
        return requested
    env = _env_threads()
    if env is not None:
        return env
    if gemm_macs is not None and gemm_macs >= THREADED_GEMM_MACS:
        return cpus()
    return 1


def apply_threads(requested=None, gemm_macs=None):
    """Set torch's intra-op thread count by choose_threads; returns the count."""
    n = choose_threads(requested, gemm_macs)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


# -- determinism -------------------------------------------------------------------------------
@contextmanager
def _quiet_tf32_api():
    """Silence torch 2.9–2.11's one-time warning that the TF32 flags (allow_tf32,
    set_float32_matmul_precision) will be replaced by the fp32_precision API.  The old flags are
    kept on purpose: they exist and mean the same on every torch refnet supports (2.4–2.14), and
    mixing the two APIs is refused by some of those versions."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(TF32|fp32_precision|tf32)", category=UserWarning)
        yield


@contextmanager
def determinism(device):
    """Verification settings, restored on exit.

    CPU: float32 matmul precision "highest" (no bf16/tf32 GEMM through oneDNN).  CUDA, in addition:
    TF32 off for matmul and cuDNN, deterministic algorithms on, cuDNN benchmark off.  The cuBLAS
    workspace config these need is set at import (module docstring).
    """
    is_cuda = str(device).startswith("cuda")
    with _quiet_tf32_api():
        prev_precision = torch.get_float32_matmul_precision()
        prev_det = torch.are_deterministic_algorithms_enabled()
        prev_det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        if is_cuda:
            prev_tf32 = torch.backends.cuda.matmul.allow_tf32
            prev_cudnn_tf32 = torch.backends.cudnn.allow_tf32
            prev_bench = torch.backends.cudnn.benchmark
            prev_cudnn_det = torch.backends.cudnn.deterministic
    try:
        with _quiet_tf32_api():
            torch.set_float32_matmul_precision("highest")
            if is_cuda:
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # see docstring
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cudnn.benchmark = False
                torch.backends.cudnn.deterministic = True
                torch.use_deterministic_algorithms(True)
        yield
    finally:
        with _quiet_tf32_api():
            torch.set_float32_matmul_precision(prev_precision)
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_det_warn)
            if is_cuda:
                torch.backends.cuda.matmul.allow_tf32 = prev_tf32
                torch.backends.cudnn.allow_tf32 = prev_cudnn_tf32
                torch.backends.cudnn.benchmark = prev_bench
                torch.backends.cudnn.deterministic = prev_cudnn_det
