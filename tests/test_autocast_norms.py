"""Layer norm and batch norm under CPU autocast (issue 23): neither is in an AutocastCPU list, so
each gets the low-dtype (L) activations with float32 weight, bias (and running statistics) and
runs its mixed-dtype kernel (<T = L, param float>).  manual.autocast mirrors them:
  layer norm  the forward kernel called; dx in float in the reduced frame's lane order (two
              accumulators per 2·lanes block, the Σx·(dy·w) steps contracted), rounded once;
              dweight/dbias per thread chunk in an L buffer rounded after every row, the chunks
              added in float32 (manual.kernel_order.ln_mixed_*)
  batch norm  the forward kernel called; float partials per thread chunk added in float (not
              double); dx's FMA per L: float16 all contracted, bfloat16 only the scalar tail
              (manual.kernel_order.bn_mixed_dx_inner)
Checked against aten's backward op by op at 1, 2 and 3 threads, and through training."""
import pytest
import torch

from manual import autocast as ac, kernel_order
from refnet import harness
from refnet.data import load_data
from refnet.spec import Spec

SHAPES = [(37, 5), (29, 8), (37, 13), (40, 16), (64, 24), (33, 32), (64, 48), (200, 64),
          (20, 100), (30, 37), (50, 250), (7, 333)]


@pytest.fixture(params=[1, 2, 3], ids=["1thread", "2threads", "3threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _case(m, n, low, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g).to(low)
    w, b = torch.randn(n, generator=g) * 0.5 + 1, torch.randn(n, generator=g)
    dy = torch.randn(m, n, generator=g).to(low)
    return x, w, b, dy


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_layernorm_backward_matches_the_mixed_kernel(threads, low):
    for m, n in SHAPES:
        x, w, b, dy = _case(m, n, low, m * n)
        out_m, cache = ac.autocast_layernorm_forward(x, w, b, 1e-5)
        out_t, mean, rstd = torch.native_layer_norm(x, [n], w, b, 1e-5)
        grads_t = torch.ops.aten.native_layer_norm_backward(dy, x, [n], mean, rstd, w, b,
                                                            [True, True, True])
        grads_m = ac.autocast_layernorm_backward(dy, cache)
        assert out_m.dtype == low and torch.equal(out_m, out_t)
        for name, gm, gt in zip(("dx", "dweight", "dbias"), grads_m, grads_t):
            assert gm.dtype == gt.dtype and torch.equal(gm, gt), (name, m, n, int((gm != gt).sum()))


def test_dweight_summed_in_float32_is_caught():
    """The kernel's trap: dweight/dbias kept in float32 across rows (rounded once at the end)
    instead of in the L buffer rounded after every row differs — the check above sees it."""
    x, w, b, dy = _case(200, 64, torch.bfloat16, 1)
    _, mean, rstd = torch.native_layer_norm(x, [64], w, b, 1e-5)
    _, dw_t, db_t = torch.ops.aten.native_layer_norm_backward(dy, x, [64], mean, rstd, w, b,
                                                              [True, True, True])
    xhat = torch.addcmul(-rstd * mean, rstd, x.float())
    dw_f32, db_f32 = (dy.float() * xhat).sum(0), dy.float().sum(0)
    assert not torch.equal(dw_f32, dw_t) and not torch.equal(db_f32, db_t)
    dw_m, db_m = kernel_order.ln_mixed_param_grads(dy, x, mean, rstd)
    assert torch.equal(dw_m, dw_t) and torch.equal(db_m, db_t)


BN_SHAPES = [(50, 37), (25, 17), (25, 48), (200, 64), (333, 70), (25, 5), (40, 13), (100, 100)]


def _bn_case(m, c, low, seed, training):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, c, generator=g) * 3 + 1).to(low)
    w, b = torch.randn(c, generator=g) * 0.5 + 1, torch.randn(c, generator=g)
    running = (torch.randn(c, generator=g) * 0.1, torch.rand(c, generator=g) + 0.5)
    out_t, mean, invstd = torch.native_batch_norm(x, w, b, *[r.clone() for r in running],
                                                  training, 0.1, 1e-5)
    stats = [r.clone() for r in running]
    out_m, cache = ac.autocast_batchnorm_forward(x, w, b, *stats, training=training,
                                                 momentum=0.1, eps=1e-5)
    dy = (torch.randn(m, c, generator=g) * 10.0 ** (seed % 5 - 2)).to(low)
    grads_t = torch.ops.aten.native_batch_norm_backward(dy, x, w, *running, mean, invstd,
                                                        training, 1e-5, [True, True, True])
    return (out_m, out_t), ac.autocast_batchnorm_backward(dy, cache), grads_t


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_backward_matches_the_mixed_kernel(threads, low, training):
    for m, c in BN_SHAPES:
        for seed in range(8 if training else 2):
            (out_m, out_t), grads_m, grads_t = _bn_case(m, c, low, seed, training)
            assert out_m.dtype == low and torch.equal(out_m, out_t)
            for name, gm, gt in zip(("dx", "dweight", "dbias"), grads_m, grads_t):
                assert gm.dtype == gt.dtype and torch.equal(gm, gt), \
                    (name, m, c, seed, int((gm != gt).sum()))


def test_batchnorm_planted_mistakes_are_caught(monkeypatch):
    """The two facts that decide the mixed batch norm's bits: the thread partials are added in
    float (adding them in double, as the float32 kernel does, differs from 3 threads on), and
    bfloat16's vector body is not contracted (the float32 kernel's FMA rule differs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        fold = kernel_order.bn_column_sums
        monkeypatch.setattr(ac, "bn_column_sums", lambda xc, dy, dtype: fold(xc, dy, torch.float64))
        assert any(not all(torch.equal(a, b) for a, b in zip(*_bn_case(333, 70, torch.bfloat16, s,
                                                                        True)[1:]))
                   for s in range(10))
        monkeypatch.undo()
        monkeypatch.setattr(ac, "bn_mixed_dx_inner", lambda dy, gm, xc, k, low:
                            torch.addcmul(dy - gm, xc, k, value=-1))
        assert any(not torch.equal(*[g[0] for g in _bn_case(m, c, torch.bfloat16, s, True)[1:]])
                   for m, c in BN_SHAPES for s in range(8))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
@pytest.mark.parametrize("autocast, act, k, scaler, clip", [
    ("bfloat16", "tanh", 1, None, None),
    ("float16", "relu", 2, {"init_scale": 2.0 ** 20, "growth_interval": 2, "growth_factor": 1.5},
     {"max_norm": 0.05}),
    ("bfloat16", "sigmoid", 3, True, None),
    ("float16", "elu", 1, True, {"max_norm": 1.0, "norm_type": "inf"}),
])
def test_net_with_a_norm_under_autocast_trains_bitwise(threads, norm, autocast, act, k, scaler,
                                                       clip):
    spec = Spec(sizes=[2, 40, 37, 3], activation=act, loss="cross_entropy", data="spiral",
                n_samples=120, batch_size=20, dtype="float32", optimizer={"name": "adamw",
                                                                          "lr": 1e-2},
                steps=10, seed=5, norm=norm, dropout=0.1, autocast=autocast,
                grad_scaler=scaler, accumulate=k, clip_grad_norm=clip)
    x, target = load_data(spec)
    checks = harness.twin_checks(spec, x, target, strict_bits=True)
    assert [c.tier for c in checks] == ["bitwise"] * 3, [(c.name, c.tier) for c in checks]
    assert any(v.name == "norms.0.weight.grad" for v in checks[0].verdicts)
