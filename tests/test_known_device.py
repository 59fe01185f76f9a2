"""refnet.not_bitwise decides per device (issue 18): a CUDA spec gets the CUDA table (tolerance tier,
a stated bound per op), whatever the CPU's vector capability says."""
import pytest
import torch

from refnet import not_bitwise as known
from refnet.spec import Spec


def spec(device, **over):
    return Spec.from_dict({"sizes": [3, 5, 2], "activation": "tanh", "loss": "cross_entropy",
                           "data": "random", "device": device, **over})


@pytest.mark.parametrize("capability", ["AVX512", "DEFAULT"])
def test_cuda_specs_do_not_go_by_the_cpu_capability(monkeypatch, capability):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    keys = [k for k, _ in known.known_issues(spec("cuda"))]
    assert {"matmul", "activation:tanh", "loss:cross_entropy"} <= set(keys)
    assert known.expected_tier(spec("cuda"), "cuda", "grad") == "tolerance"
    note = known.note(spec("cuda"))
    assert "loss:cross_entropy not bitwise on CUDA" in note and "activation:tanh" in note


def test_cpu_still_goes_by_capability(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert known.known_issues(spec("cpu")) == []
    assert known.expected_tier(spec("cpu"), "cpu", "grad") == "bitwise"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert [k for k, _ in known.known_issues(spec("cpu"))] == ["loss:cross_entropy"]


def test_the_device_argument_overrides_the_specs():
    s = spec("cpu", loss="mse")
    assert [k for k, _ in known.known_issues(s, "cuda")][:1] == ["activation:tanh"]
    assert "matmul" in dict(known.known_issues(s, "cuda"))
    assert known.expected_tier(s, "cuda", "training") == "tolerance"


def test_every_cuda_entry_states_a_bound_and_a_reason():
    for key, entry in known.CUDA_NOT_BITWISE.items():
        assert entry["bound"] and entry["reason"], key
