"""Numerical settings under which manual and twin are compared, and device resolution."""
from contextlib import contextmanager
import os

import torch


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


@contextmanager
def determinism(device):
    """Verification settings, restored on exit.

    CPU: float32 matmul precision "highest" (no bf16/tf32 GEMM through oneDNN).  CUDA, in addition:
    TF32 off for matmul and cuDNN, deterministic algorithms on, cuDNN benchmark off, and a cuBLAS
    workspace config (read by CUDA at handle creation).
    """
    prev_precision = torch.get_float32_matmul_precision()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    is_cuda = str(device).startswith("cuda")
    if is_cuda:
        prev_tf32 = torch.backends.cuda.matmul.allow_tf32
        prev_cudnn_tf32 = torch.backends.cudnn.allow_tf32
        prev_bench = torch.backends.cudnn.benchmark
        prev_cudnn_det = torch.backends.cudnn.deterministic
    try:
        torch.set_float32_matmul_precision("highest")
        if is_cuda:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True)
        yield
    finally:
        torch.set_float32_matmul_precision(prev_precision)
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_det_warn)
        if is_cuda:
            torch.backends.cuda.matmul.allow_tf32 = prev_tf32
            torch.backends.cudnn.allow_tf32 = prev_cudnn_tf32
            torch.backends.cudnn.benchmark = prev_bench
            torch.backends.cudnn.deterministic = prev_cudnn_det
            if prev_env is None:
                os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
            else:
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = prev_env
