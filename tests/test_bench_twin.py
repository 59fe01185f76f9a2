"""The bench times what is verified (issue 18): the twin's SGD is the single-tensor path on every
device, and deterministic mode's fill of fresh allocations is off while timing."""
import torch

from refnet import bench


def test_bench_twin_uses_single_tensor_sgd():
    cfg = bench.SIZES["xor"]
    params = bench._params(cfg, torch.float32, "cpu")
    for momentum in (0.0, 0.9):
        _, _, opt = bench._twin(cfg, params, torch.float32, "cpu", momentum)
        assert opt.defaults["foreach"] is False


def test_bench_times_without_filling_fresh_allocations(monkeypatch):
    import torch.utils.deterministic as flags
    seen = []

    def fake_size(name, device, *args, **kwargs):
        seen.append((flags.fill_uninitialized_memory, torch.get_float32_matmul_precision()))
        return {"size": name}
    monkeypatch.setattr(bench, "bench_size", fake_size)
    before = flags.fill_uninitialized_memory
    rep = bench.run(["xor"], device="cpu", threads=1)
    assert rep["rows"] == [{"size": "xor"}]
    assert seen == [(False, "highest")]
    assert flags.fill_uninitialized_memory == before
