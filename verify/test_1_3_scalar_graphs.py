"""Sections 1–3: scalar graphs — (x+y)·z, the sigmoid neuron, the gate patterns and max ties."""
import pytest
import torch

from refnet.examples import Context
from refnet.examples import scalar as S
from verify._examples import assert_all, run


@pytest.mark.parametrize("name", ["scalar_graph", "sigmoid_neuron", "gate_patterns"])
def test_three_oracles(name, device, dtype, refnet_check):
    checks = run(name, device, dtype)
    assert_all(checks, device, refnet_check)
    assert "document" in checks
    assert ("finite_differences" in checks) == (dtype == torch.float64)


def test_scalar_graph_numbers(device, dtype):
    got = S.scalar_graph_manual(**{k: torch.tensor(v, dtype=dtype, device=device)
                                   for k, v in S.SCALAR_GRAPH_INPUTS.items()})
    for key, want in S.SCALAR_GRAPH_DOC.items():
        assert got[key].item() == want, key


def test_sigmoid_neuron_numbers(device, dtype):
    got = S.sigmoid_neuron_manual(**{k: torch.tensor(v, dtype=dtype, device=device)
                                     for k, v in S.SIGMOID_NEURON_INPUTS.items()})
    for key, (want, precision) in S.SIGMOID_NEURON_DOC.items():
        assert got[key].item() == pytest.approx(want, abs=precision + 1e-6), key
    for key, want in S.SIGMOID_NEURON_ROUNDED.items():
        assert round(got[key].item(), 2) == want, key


def test_gate_numbers_and_ties(device, dtype):
    ctx = Context(device=device, dtype=dtype)
    got = S.gate_patterns_manual(ctx)
    for gate, case in S.GATE_DOC.items():
        assert got[f"{gate}.out"].item() == case["out"]
        assert got[f"{gate}.grads"].tolist() == list(case["grads"])
    ties = S.ties_manual(ctx)
    for name, case in S.TIE_CASES.items():
        assert ties[name].tolist() == list(case["grads"]), name
