"""Section 8: vectorized backprop with the document's matrices."""
import pytest
import torch

from refnet.examples import vectorized as V
from verify._examples import assert_all, run


@pytest.mark.parametrize("name", ["vector_relu", "matrix_multiply", "vectorized_l2"])
def test_three_oracles(name, device, dtype, refnet_check):
    checks = run(name, device, dtype)
    assert_all(checks, device, refnet_check)
    assert checks["document"].passed


def test_document_numbers(device, dtype):
    t = lambda v: torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
    m = V.matmul_manual(t(V.MATMUL["x"]), t(V.MATMUL["w"]), t(V.MATMUL["dy"]))
    for key in ("y", "dx", "dw"):
        assert m[key].tolist() == V.MATMUL[key], key
    l2 = V.l2_manual(t(V.L2["W"]), t(V.L2["x"]))
    for key in ("q", "f", "dq", "dW", "dx"):
        assert torch.allclose(l2[key].double().cpu(), torch.tensor(V.L2[key], dtype=torch.float64),
                              rtol=0, atol=1e-6), key
