"""CUDA settings that must be right before the first GPU run, checked on the CPU (issue 18):
the cuBLAS workspace variable is set at import and never unset, and determinism() does not leak
torch's TF32-API warning."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from refnet import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env_after_import(env_value):
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    if env_value is not None:
        env["CUBLAS_WORKSPACE_CONFIG"] = env_value
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = "import os, refnet; print(repr(os.environ.get('CUBLAS_WORKSPACE_CONFIG')))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)  # a hang guard only
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_sets_the_cublas_workspace_before_any_cuda_work():
    assert _env_after_import(None) == repr(settings.CUBLAS_WORKSPACE)


def test_import_keeps_the_users_cublas_workspace():
    assert _env_after_import(":16:8") == repr(":16:8")


def test_determinism_never_unsets_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with settings.determinism("cuda"):
        pass
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == settings.CUBLAS_WORKSPACE
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with settings.determinism("cuda"):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


TF32_WARNING = ("Please use the new API settings to control TF32 behavior, such as "
                "torch.backends.cudnn.conv.fp32_precision = 'tf32' or "
                "torch.backends.cuda.matmul.fp32_precision = 'ieee'.")


class _WarningMatmul:
    """torch 2.9–2.11's torch.backends.cuda.matmul as far as the TF32 flag goes: it warns."""

    def __init__(self):
        self._tf32 = False
        self.sets = []

    @property
    def allow_tf32(self):
        warnings.warn(TF32_WARNING, UserWarning)
        return self._tf32

    @allow_tf32.setter
    def allow_tf32(self, value):
        warnings.warn(TF32_WARNING, UserWarning)
        self.sets.append(value)
        self._tf32 = value


def test_determinism_does_not_leak_the_tf32_api_warning(monkeypatch):
    fake = _WarningMatmul()
    monkeypatch.setattr(torch.backends.cuda, "matmul", fake)
    real_set = torch.set_float32_matmul_precision

    def warning_set(precision):
        warnings.warn(TF32_WARNING, UserWarning)
        real_set(precision)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", warning_set)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with settings.determinism("cuda"):
            assert fake._tf32 is False
        warnings.warn("refnet's own warning still shows", UserWarning)
    assert fake.sets == [False, False]   # set off inside, restored on exit
    assert [str(w.message) for w in caught] == ["refnet's own warning still shows"]


# -- the thread policy ---------------------------------------------------------------------------
@pytest.fixture
def no_thread_env(monkeypatch):
    for var in settings.THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def test_small_workloads_get_one_thread(no_thread_env):
    assert settings.choose_threads() == 1
    seed = settings.largest_gemm_macs([1000, 100, 10], 64)          # two_layer_seed
    assert seed == 64 * 1000 * 100 and settings.choose_threads(gemm_macs=seed) == 1


def test_large_gemms_get_every_cpu(no_thread_env, monkeypatch):
    monkeypatch.setattr(settings, "cpus", lambda: 7)
    large = settings.largest_gemm_macs([2048, 2048, 2048], 1024)   # bench "large"
    assert settings.choose_threads(gemm_macs=large) == 7


def test_threads_flag_then_environment_override_the_policy(no_thread_env, monkeypatch):
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    assert settings.choose_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")       # torch reads OMP first
    assert settings.choose_threads() == 2
    assert settings.choose_threads(requested=5, gemm_macs=1) == 5
    with pytest.raises(ValueError, match="--threads: expected an integer >= 1"):
        settings.choose_threads(requested=0)


def test_apply_threads_sets_torch(no_thread_env):
    before = torch.get_num_threads()
    try:
        assert settings.apply_threads(requested=2) == 2 == torch.get_num_threads()
        assert settings.apply_threads() == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
