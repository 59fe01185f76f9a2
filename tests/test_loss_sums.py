"""The label losses' batch sums: O(1) tensor ops, the same bits as the CPU kernels.

manual/losses.py evaluates nll_loss's 8-level cascade (manual/kernel_order.py) and multi_margin_loss's row and batch sums
with one sequential-sum op per level (index_add_ on 1-D tensors).  Here they are checked bit for
bit against the plain one-sample-at-a-time reference (``nll_mean_reference``, the kernel's loop
written out) and against autograd's F.cross_entropy / F.multi_margin_loss, at batch sizes on both
sides of the cascade's boundaries (16, 256, 4096).
"""
import pytest
import torch
import torch.nn.functional as F

from manual import kernel_order, losses

BATCHES = (1, 2, 15, 16, 17, 255, 256, 257, 4097)
DTYPES = (torch.float32, torch.float64)


def _logits(n, c, dtype, seed):
    """Scores of mixed magnitudes (1e-3 … 1e3 per row), so that the order of a sum shows in its
    bits; every third row has a winning logit of 1e4 (log-probability exactly 0 there)."""
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-3, 4, (n, 1), generator=gen)
    y = (torch.randn(n, c, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if seed % 2:
        y[::3, 0] = 1e4
    return y, torch.randint(0, c, (n,), generator=gen)


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", BATCHES)
def test_nll_cascade_is_bitwise_with_the_reference_loop_and_autograd(n, dtype):
    for seed in (0, 1):
        y, t = _logits(n, 5, dtype, seed)
        picked = torch.log_softmax(y, 1).gather(1, t.unsqueeze(1)).squeeze(1)
        fast = kernel_order.nll_mean(picked, n)
        assert _same(fast, kernel_order.nll_mean_reference(picked, n)), (n, dtype, seed)
        assert _same(fast, F.cross_entropy(y, t)), (n, dtype, seed)


def test_the_nll_check_can_fail():
    """A plain sum gives other bits on these inputs, so the checks above are not vacuous."""
    differs = 0
    for n in (255, 257, 4097):
        y, t = _logits(n, 5, torch.float32, 0)
        picked = torch.log_softmax(y, 1).gather(1, t.unsqueeze(1)).squeeze(1)
        differs += not torch.equal(-(picked.sum()) / float(n), F.cross_entropy(y, t))
    assert differs >= 1


@pytest.mark.parametrize("n", [1, 2, 3, 127, 128, 129, 130, 131, 200, 257, 300])
def test_nll_cascade_with_a_small_step_reaches_its_last_level(n, monkeypatch):
    """With a level step of 2 instead of 16 (both versions read the same constants), a few
    hundred samples reach level 7, which sums everything it receives: that branch is checked
    against the reference loop here."""
    monkeypatch.setattr(kernel_order, "NLL_LEVEL_POWER", 1)
    monkeypatch.setattr(kernel_order, "NLL_LEVEL_STEP", 2)
    y, t = _logits(n, 5, torch.float32, 0)
    picked = torch.log_softmax(y, 1).gather(1, t.unsqueeze(1)).squeeze(1)
    assert _same(kernel_order.nll_mean(picked, n), kernel_order.nll_mean_reference(picked, n)), n


def test_nll_cascade_past_one_level_of_4096():
    """65537 samples reach level 4 of the cascade (checked against autograd only: the reference
    loop would take a minute)."""
    y, t = _logits(65537, 3, torch.float32, 1)
    picked = torch.log_softmax(y, 1).gather(1, t.unsqueeze(1)).squeeze(1)
    assert _same(kernel_order.nll_mean(picked, 65537), F.cross_entropy(y, t))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", BATCHES)
def test_label_losses_forward_and_backward_are_bitwise_with_autograd(n, dtype):
    for seed in (0, 1):
        y, t = _logits(n, 7, dtype, seed)
        y = y / 1e3 if seed == 0 else y      # many active margins for the SVM
        for name, ref_fn in (("cross_entropy", F.cross_entropy), ("svm", F.multi_margin_loss)):
            loss, cache = losses.loss_forward(name, y, t)
            dy = losses.loss_backward(name, torch.ones((), dtype=dtype), cache)
            yt = y.clone().requires_grad_()
            ref = ref_fn(yt, t)
            ref.backward()
            assert _same(loss, ref.detach()), (name, n, dtype, seed)
            assert _same(dy, yt.grad), (name, n, dtype, seed)


def test_loss_op_count_does_not_grow_with_the_batch():
    """The point of the blocked sums: the number of tensor ops per loss forward+backward is the
    same at N = 300 as at N = 4096 (within the cascade's one extra level)."""
    from torch.profiler import profile

    def ops(name, n):
        y, t = _logits(n, 10, torch.float32, 0)
        with profile() as prof:
            loss, cache = losses.loss_forward(name, y, t)
            losses.loss_backward(name, torch.ones(()), cache)
        return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))

    for name in ("cross_entropy", "svm"):
        small, large = ops(name, 300), ops(name, 4096)
        assert large <= small + 16, (name, small, large)


def _kernel_exp(x):
    """eˣ as the log_softmax backward kernel computes it: with a row sum of −1 in column 0,
    dx_j = 0 − exp(x_j)·(−1) = exp(x_j) exactly, for any values x placed in columns 1…"""
    rows = x.view(-1, 64)
    lp = torch.cat([torch.zeros(rows.shape[0], 1, dtype=x.dtype), rows], 1)
    probe = torch.zeros_like(lp)
    probe[:, 0] = -1.0
    return torch.ops.aten._log_softmax_backward_data(probe, lp, 1, x.dtype)[:, 1:].reshape(-1)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="the kernel uses std::exp under ATEN_CPU_CAPABILITY=default")
def test_sleef_exp_is_bitwise_with_the_kernel_on_wide_sweeps():
    """The shortened exp (cached constants; float32 scaled by 2^q in one float64 product) against
    the kernel: every float32 in [−104.5, −86] (where results go subnormal and the scaling
    matters), and dense sweeps over the whole range of both dtypes, infinities and NaN included."""
    from manual.kernel_exp import sleef_exp
    lo, hi = (torch.tensor([v], dtype=torch.float32).view(torch.int32).item() for v in (-86.0, -104.5))
    every = torch.arange(lo, hi + 1, dtype=torch.int32).view(torch.float32)
    gen = torch.Generator().manual_seed(0)
    for dtype, low, high, extra in ((torch.float32, -120.0, 110.0, [every]),
                                    (torch.float64, -1100.0, 720.0, [])):
        sweep = torch.linspace(low, high, 1 << 20, dtype=torch.float64).to(dtype)
        noise = (torch.rand(1 << 20, generator=gen, dtype=torch.float64) * (high - low) + low).to(dtype)
        special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")] + [1.0] * 59,
                               dtype=dtype)
        x = torch.cat([special] + extra + [sweep, noise])
        x = x[: x.numel() // 64 * 64]
        mine, kernel = sleef_exp(x), _kernel_exp(x)
        same = (mine == kernel) | (mine.isnan() & kernel.isnan())
        assert bool(same.all()), (dtype, x[~same][:5])
