"""manual/blocks.py against refnet.twin.FFNBlock (nn.LayerNorm / nn.Linear, the residual add in
forward) + autograd: output, input gradient and every parameter gradient bit for bit."""
import pytest
import torch

from manual import blocks
from refnet import twin as twin_mod

N, D, H = 7, 13, 21      # odd sizes: partial vector tails in layer norm's row sums and the GEMMs


def _case(n_blocks, norm, activation, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = blocks.init_block_params(n_blocks, D, H, norm, generator=gen, dtype=dtype)
    if norm == "layer":   # away from LayerNorm's 1 / 0 start, so a swapped gradient shows
        for i in range(n_blocks):
            for kind in ("weight", "bias"):
                name = f"blocks.{i}.norm.{kind}"
                params[name] = torch.randn(D, generator=gen, dtype=torch.float64).to(dtype)
    h = (torch.randn(N, D, generator=gen, dtype=torch.float64) * 2).to(dtype)
    dout = torch.randn(N, D, generator=gen, dtype=torch.float64).to(dtype)
    stack = twin_mod.ffn_blocks(n_blocks, D, H, activation, norm, dtype=dtype)
    twin_mod._copy_into({f"blocks.{k}": v for k, v in stack.named_parameters()}, params, "params")
    return params, h, dout, stack


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_blocks", [1, 2])
@pytest.mark.parametrize("norm", ["layer", None], ids=["layernorm", "no-norm"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_blocks_bitwise_against_autograd(dtype, n_blocks, norm, activation):
    params, h, dout, stack = _case(n_blocks, norm, activation, dtype)
    out_m, caches = blocks.blocks_forward(h, params, n_blocks, activation, norm)
    dh_m, grads_m = blocks.blocks_backward(dout, caches)

    ht = h.clone().requires_grad_(True)
    out_t = ht
    for block in stack:
        out_t = block(out_t)
    out_t.backward(dout)
    assert torch.equal(out_m, out_t.detach())
    assert torch.equal(dh_m, ht.grad)
    twin_grads = {f"blocks.{k}": p.grad for k, p in stack.named_parameters()}
    assert set(grads_m) == set(twin_grads) == set(params)
    for name, g in twin_grads.items():
        assert torch.equal(grads_m[name], g), name


def test_residual_gradient_is_identity_plus_branch():
    """With the branch's last layer zeroed, the block is the identity: dh = dout exactly, and the
    branch still gets its fc2 gradients."""
    params, h, dout, _ = _case(1, "layer", "tanh", torch.float64)
    params["blocks.0.fc2.weight"].zero_()
    params["blocks.0.fc2.bias"].zero_()
    out, caches = blocks.blocks_forward(h, params, 1, "tanh", "layer")
    dh, grads = blocks.blocks_backward(dout, caches)
    assert torch.equal(out, h) and torch.equal(dh, dout)
    assert torch.equal(grads["blocks.0.fc2.bias"], dout.sum(0))


@pytest.mark.parametrize("activation,norm,message", [
    ("maxout", "layer", "blocks.activation: maxout changes the width"),
    ("swish", "layer", "activation: unknown name 'swish'"),
    ("relu", "batchnorm", "blocks.norm: expected 'layer' or null"),
])
def test_bad_block_settings(activation, norm, message):
    with pytest.raises(ValueError, match=message):
        blocks.check_block_settings(activation, norm)
