"""manual/norm.py, dropout.py, embedding.py against nn.BatchNorm1d / LayerNorm / Dropout /
Embedding + autograd, float32 and float64, odd sizes (vector tails), one and two threads."""
import pytest
import torch

from manual.dropout import dropout_backward, dropout_forward
from manual.embedding import embedding_backward, embedding_forward
from manual.fast import FastMLP
from manual.norm import (batchnorm_backward, batchnorm_backward_steps, batchnorm_forward,
                         batchnorm_forward_steps, layernorm_backward, layernorm_forward)
from refnet.data import load_data
from refnet.harness import build_pair, train_lockstep
from refnet.spec import Spec
from refnet.twin import Twin

DTYPES = [torch.float32, torch.float64]
SHAPES = [(32, 64), (7, 13), (50, 37), (3, 100), (2, 1), (257, 21)]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _inputs(n, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64).mul_(3).add_(1).to(dtype)
    dy = torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return x, dy, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_fused_bitwise(dtype, shape, training, threads):
    x, dy, w, b = _inputs(*shape, dtype)
    bn = torch.nn.BatchNorm1d(shape[1], momentum=0.3, eps=1e-3, dtype=dtype)
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    nbt = bn.num_batches_tracked.clone()
    bn.train(training)
    xr = x.clone().requires_grad_()
    y = bn(xr)
    y.backward(dy)
    out, cache = batchnorm_forward(x, w, b, rm, rv, training=training, momentum=0.3, eps=1e-3,
                                   num_batches_tracked=nbt)
    dx, dw, db = batchnorm_backward(dy, cache)
    assert torch.equal(out, y)
    assert torch.equal(rm, bn.running_mean) and torch.equal(rv, bn.running_var)
    assert torch.equal(nbt, bn.num_batches_tracked)
    assert torch.equal(dx, xr.grad)
    assert torch.equal(dw, bn.weight.grad)
    assert torch.equal(db, bn.bias.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_batchnorm_steps_bitwise_against_autograd_of_the_same_graph(dtype, shape):
    x, dy, w, b = _inputs(*shape, dtype, seed=1)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out_ref, _ = batchnorm_forward_steps(*leaves, eps=1e-5)
    out_ref.backward(dy)
    out, cache = batchnorm_forward_steps(x, w, b, eps=1e-5)
    grads = batchnorm_backward_steps(dy, cache)
    assert torch.equal(out, out_ref.detach())
    for got, leaf in zip(grads, leaves):
        assert torch.equal(got, leaf.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_steps_and_fused_agree_closely(dtype):
    # the two backwards are different arithmetic for the same derivative
    x, dy, w, b = _inputs(64, 19, dtype, seed=2)
    _, c1 = batchnorm_forward_steps(x, w, b)
    rm, rv = torch.zeros(19, dtype=dtype), torch.ones(19, dtype=dtype)
    _, c2 = batchnorm_forward(x, w, b, rm, rv)
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    for a, f in zip(batchnorm_backward_steps(dy, c1), batchnorm_backward(dy, c2)):
        torch.testing.assert_close(a, f, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm(dtype, shape, threads):
    x, dy, w, b = _inputs(*shape, dtype, seed=3)
    ln = torch.nn.LayerNorm(shape[1], eps=1e-5, dtype=dtype)
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(b)
    xr = x.clone().requires_grad_()
    y = ln(xr)
    y.backward(dy)
    out, cache = layernorm_forward(x, w, b, 1e-5)
    dx, dw, db = layernorm_backward(dy, cache)
    assert torch.equal(out, y)
    assert torch.equal(dw, ln.weight.grad)
    assert torch.equal(db, ln.bias.grad)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):   # lane order measured there
        assert torch.equal(dx, xr.grad)
    else:
        scale = float(xr.grad.abs().max())
        tol = (2e-7 if dtype == torch.float32 else 5e-16) * scale
        torch.testing.assert_close(dx, xr.grad, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 33, 64, 257])
def test_layernorm_every_width_bitwise(dtype, width):
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the kernel's lane order is measured on AVX2 and AVX-512")
    x, dy, w, b = _inputs(64, width, dtype, seed=6)
    ln = torch.nn.LayerNorm(width, dtype=dtype)
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(b)
    xr = x.clone().requires_grad_()
    ln(xr).backward(dy)
    dx, _, _ = layernorm_backward(dy, layernorm_forward(x, w, b)[1])
    assert torch.equal(dx, xr.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_dropout_same_seed_same_mask(dtype, p):
    x, dy, _, _ = _inputs(37, 23, dtype, seed=4)
    torch.manual_seed(11)
    drop = torch.nn.Dropout(p)
    xr = x.clone().requires_grad_()
    y1 = drop(xr)
    y1.backward(dy)
    y2 = drop(x)   # the second draw, to check the streams stay in step
    gen = torch.Generator().manual_seed(11)
    o1, cache = dropout_forward(x, p, generator=gen)
    o2, _ = dropout_forward(x, p, generator=gen)
    assert torch.equal(o1, y1) and torch.equal(o2, y2)
    assert torch.equal(dropout_backward(dy, cache), xr.grad)
    if p:
        assert not torch.equal(o1, o2)


def test_dropout_eval_is_identity_and_draws_nothing():
    x = torch.randn(5, 4)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    out, cache = dropout_forward(x, 0.5, training=False, generator=gen)
    assert out is x and cache is None and torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, "0.5", True, float("nan")])
def test_dropout_bad_p(p):
    with pytest.raises(ValueError, match="dropout"):
        dropout_forward(torch.randn(2, 2), p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,dim,n,t", [(27, 10, 32, 3), (5, 7, 200, 4), (1000, 33, 4096, 8)])
def test_embedding_bitwise_with_repeats(dtype, vocab, dim, n, t, threads):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(vocab, dim, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, vocab, (n, t), generator=g)
    dy = (torch.randn(n, t, dim, generator=g, dtype=torch.float64) * 1e3).to(dtype)
    emb = torch.nn.Embedding(vocab, dim, dtype=dtype)
    with torch.no_grad():
        emb.weight.copy_(w)
    y = emb(idx)
    y.backward(dy)
    out, cache = embedding_forward(idx, w)
    dw = embedding_backward(dy, cache)
    assert torch.equal(out, y)
    assert torch.equal(dw, emb.weight.grad)
    # repeated tokens really occurred, and summing them in another order changes bits somewhere
    assert torch.bincount(idx.reshape(-1)).max() > 1


@pytest.mark.parametrize("idx,match", [(torch.tensor([[0, 27]]), r"\[0, 27\)"),
                                       (torch.tensor([[-1, 0]]), r"\[0, 27\)"),
                                       (torch.tensor([[0.0, 1.0]]), "integer")])
def test_embedding_bad_indices(idx, match):
    with pytest.raises(ValueError, match=match):
        embedding_forward(idx, torch.randn(27, 4))


# --- the spec keys and the pair -----------------------------------------------------------------

@pytest.mark.parametrize("key,value,match", [
    ("norm", "groupnorm", "norm"), ("dropout", 1.0, "dropout"), ("dropout", -0.1, "dropout"),
    ("momentum", 2, "momentum"), ("eps", 0, "eps"),
    ("embedding", {"vocab": 27, "dim": 10}, "embedding"),
    ("embedding", {"vocab": 27, "dim": 1, "context": 3}, "embedding"),   # real-valued data set
])
def test_spec_bad_new_keys(key, value, match):
    with pytest.raises(ValueError, match=match):
        Spec(sizes=[3, 8, 2], data="random", **{key: value})


@pytest.mark.parametrize("norm", [None, "batchnorm"])
def test_pair_with_norm_and_dropout_is_bitwise_over_steps(norm):
    spec = Spec(sizes=[2, 17, 9, 3], activation="relu", loss="cross_entropy", data="spiral",
                norm=norm, dropout=0.25, steps=5, batch_size=30, dtype="float32", seed=2,
                optimizer={"name": "sgd", "lr": 0.1})
    pair = build_pair(spec)
    assert set(pair.twin.state_dict()) == set(pair.mlp.params) | set(pair.mlp.buffers)
    x, target = load_data(spec)
    manual_losses, twin_losses = train_lockstep(pair, x, target, 5, batch_size=30, seed=2)
    assert torch.equal(manual_losses, twin_losses)
    for name, t in pair.twin.named_buffers():
        assert torch.equal(t, pair.mlp.buffers[name])
    for name, p in pair.twin.named_parameters():
        assert torch.equal(p.detach(), pair.mlp.params[name])


@pytest.mark.parametrize("layers", [{"norm": "batchnorm"}, {"norm": "layernorm"}, {"dropout": 0.3}])
def test_fast_mlp_falls_back_for_the_new_layers(layers):
    # FastMLP's specialised plan has no norm/dropout: it must run the readable path, same bits
    spec = Spec(sizes=[2, 12, 3], activation="tanh", loss="mse", data="spiral", steps=3,
                batch_size=None, seed=1, **layers)
    slow, fast_pair = build_pair(spec), build_pair(spec)
    fast = FastMLP(fast_pair.mlp)
    assert not fast.specialised
    x, target = load_data(spec)
    for _ in range(3):
        assert torch.equal(slow.mlp.train_step(x, target), fast.train_step(x, target))
    for name, p in slow.mlp.params.items():
        assert torch.equal(p, fast_pair.mlp.params[name])


def test_dropout_on_cuda_is_refused_in_one_line():
    # CUDA's nn.Dropout runs the fused native_dropout kernel (Philox, its own draw order): manual's
    # bernoulli_ cannot draw the same masks, so such a spec is refused when it is built
    with pytest.raises(ValueError, match=r"^dropout: not supported on device cuda \(CUDA's fused") as err:
        Spec(sizes=[2, 8, 3], loss="cross_entropy", data="spiral", dropout=0.25, device="cuda")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="^dropout: not supported on device cuda"):
        Twin([2, 8, 3], dropout=0.25, device="cuda")
    # dropout 0 on CUDA, and dropout on the CPU, are fine
    Spec(sizes=[2, 8, 3], loss="cross_entropy", data="spiral", dropout=0.0, device="cuda")
    Spec(sizes=[2, 8, 3], loss="cross_entropy", data="spiral", dropout=0.25, device="cpu")


def test_batch_norm_batch_of_one_is_judged_on_the_real_row_count():
    """xor rounds n_samples 5 down to 4 rows (one full batch of 4: fine); spiral rounds 10 down to
    9 rows, and batches of 4 leave a last batch of 1: refused before training, in one line."""
    from refnet.data import load_data
    from refnet.spec import Spec
    base = {"sizes": [2, 4, 1], "norm": "batchnorm", "steps": 2}
    x, _ = load_data(Spec.from_dict({**base, "data": "xor", "n_samples": 5, "batch_size": 4}))
    assert x.shape[0] == 4
    spiral = Spec.from_dict({**base, "sizes": [2, 4, 3], "loss": "cross_entropy", "data": "spiral",
                             "n_samples": 10, "batch_size": 4})
    with pytest.raises(ValueError, match=r"^batch_size: .* batch_size 4 on 9 rows leaves a batch of 1$"):
        load_data(spiral)
    with pytest.raises(ValueError, match="got batch_size 1"):
        Spec.from_dict({**base, "data": "xor", "batch_size": 1})
