"""manual/kernel_order.py's ChunkedColumnSums (batch norm's Σdy and Σ(x−μ)·dy, layer norm's
dweight and dbias in O(1) torch calls) against the plain row-by-row loop it replaced and against
autograd: batch sizes around the vector widths (8 float32 / 4 float64 lanes on AVX2, 16 / 8 on
AVX-512) and their tails, and around the 2-thread chunk boundary; float32 and float64."""
import pytest
import torch

from manual import kernel_order
from manual.norm import batchnorm_backward, batchnorm_forward, layernorm_backward, layernorm_forward

DTYPES = [torch.float32, torch.float64]
BATCHES = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65]
WIDTHS = [1, 3, 8, 9, 17, 200]


def _loop_sums(a, b, fold_dtype):
    """The row-by-row reference: (Σₙ b, Σₙ a·b with one FMA per step) per thread chunk, chunk
    partials added in fold_dtype from +0 (the loop kernel_order used before)."""
    zero = torch.zeros(a.shape[1], dtype=a.dtype)
    total_sum = total_dot = torch.zeros(a.shape[1], dtype=fold_dtype)
    for begin, end in kernel_order.thread_chunks(a.shape[0]):
        chunk_sum, chunk_dot = zero, zero
        for i in range(begin, end):
            chunk_sum = chunk_sum + b[i]
            chunk_dot = torch.addcmul(chunk_dot, a[i], b[i])
        total_sum = total_sum + chunk_sum.to(fold_dtype)
        total_dot = total_dot + chunk_dot.to(fold_dtype)
    return total_sum.to(a.dtype), total_dot.to(a.dtype)


def _data(n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # magnitudes spread over 6 decades so that the order of the adds shows in the last bits
    scale = 10.0 ** torch.randint(-3, 3, (n, d), generator=g).double()
    a = torch.randn(n, d, generator=g, dtype=torch.float64).mul_(scale).to(dtype)
    b = torch.randn(n, d, generator=g, dtype=torch.float64).mul_(scale.flip(0)).to(dtype)
    return a, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fold", ["float64", "own"])
@pytest.mark.parametrize("threads", [1, 2, 4], indirect=True)   # 4: folds of > 2 partials
def test_chunked_sums_equal_the_row_loop(dtype, fold, threads):
    fold_dtype = torch.float64 if fold == "float64" else dtype
    for n in BATCHES:
        for d in WIDTHS:
            a, b = _data(n, d, dtype, seed=n * 1000 + d)
            sums = kernel_order.ChunkedColumnSums(n, d, dtype, a.device, fold_dtype)
            want_sum, want_dot = _loop_sums(a, b, fold_dtype)
            got_sum, got_dot = sums.sum(b), sums.dot(a, b)
            assert torch.equal(got_sum, want_sum), (n, d)
            assert torch.equal(got_dot, want_dot), (n, d)
            out = torch.empty(d, dtype=dtype)            # the buffer form FastMLP uses
            assert torch.equal(sums.dot(a, b, out=out),
                               want_dot) and sums.sum(b, out=out) is out


@pytest.mark.parametrize("threads", [1], indirect=True)
def test_dot_is_one_fma_per_step(threads):
    # −(1 + 2⁻²²) + (1 + 2⁻²³)² = 2⁻⁴⁶ exactly: one FMA keeps it, multiply-then-add gives 0
    a = torch.tensor([[-1.0], [1 + 2 ** -23]])
    b = torch.tensor([[1 + 2 ** -22], [1 + 2 ** -23]])
    sums = kernel_order.ChunkedColumnSums(2, 1, torch.float32, a.device, torch.float32)
    assert sums.dot(a, b).item() == 2 ** -46


def test_plan_knows_when_it_no_longer_holds(threads):
    sums = kernel_order.ChunkedColumnSums(9, 4, torch.float32, torch.device("cpu"), torch.float64)
    assert sums.matches(9, 4) and not sums.matches(8, 4) and not sums.matches(9, 5)
    torch.set_num_threads(3 - threads)
    assert not sums.matches(9, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_and_layernorm_backward_match_autograd_at_every_batch(dtype, threads):
    for n in [2, 3, 7, 8, 9, 16, 17, 33, 65]:
        for d in [3, 8, 17]:
            x, dy = _data(n, d, dtype, seed=7 * n + d)
            w = torch.linspace(0.5, 2, d, dtype=dtype)
            bias = torch.linspace(-1, 1, d, dtype=dtype)
            leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
            torch.nn.functional.batch_norm(leaves[0], None, None, leaves[1], leaves[2],
                                           training=True).backward(dy)
            _, cache = batchnorm_forward(x, w, bias, torch.zeros(d, dtype=dtype),
                                         torch.ones(d, dtype=dtype), training=True)
            for got, leaf in zip(batchnorm_backward(dy, cache), leaves):
                assert torch.equal(got, leaf.grad), ("batch norm", n, d)
            leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
            torch.nn.functional.layer_norm(leaves[0], [d], leaves[1], leaves[2]).backward(dy)
            _, cache = layernorm_forward(x, w, bias)
            for got, leaf in zip(layernorm_backward(dy, cache), leaves):
                assert torch.equal(got, leaf.grad), ("layer norm", n, d)
