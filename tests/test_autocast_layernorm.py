"""Layer norm under CPU autocast (issue 23): layer_norm is in no AutocastCPU list, so it gets the
low-dtype (L) activations with float32 weight and bias and runs the mixed-dtype kernel
(layer_norm_kernel.cpp, <T = L, param float>).  manual.autocast mirrors it: the forward kernel
called; dx in float in the reduced frame's lane order (two accumulators per 2·lanes block, the
Σx·(dy·w) steps contracted), rounded once; dweight/dbias accumulated per thread chunk in an L
buffer rounded after every row, the chunks added in float32 (manual.kernel_order.ln_mixed_*).
Checked against aten's backward op by op, at 1 and 2 threads, and through training."""
import pytest
import torch

from manual import autocast as ac, kernel_order
from refnet import harness
from refnet.data import load_data
from refnet.spec import Spec

SHAPES = [(37, 5), (29, 8), (37, 13), (40, 16), (64, 24), (33, 32), (64, 48), (200, 64),
          (20, 100), (30, 37), (50, 250), (7, 333)]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
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


@pytest.mark.parametrize("autocast, act, k, scaler, clip", [
    ("bfloat16", "tanh", 1, None, None),
    ("float16", "relu", 2, {"init_scale": 2.0 ** 20, "growth_interval": 2, "growth_factor": 1.5},
     {"max_norm": 0.05}),
    ("bfloat16", "sigmoid", 3, True, None),
    ("float16", "elu", 1, True, {"max_norm": 1.0, "norm_type": "inf"}),
])
def test_layernorm_net_under_autocast_trains_bitwise(threads, autocast, act, k, scaler, clip):
    spec = Spec(sizes=[2, 40, 37, 3], activation=act, loss="cross_entropy", data="spiral",
                n_samples=120, batch_size=20, dtype="float32", optimizer={"name": "adamw",
                                                                          "lr": 1e-2},
                steps=10, seed=5, norm="layernorm", dropout=0.1, autocast=autocast,
                grad_scaler=scaler, accumulate=k, clip_grad_norm=clip)
    x, target = load_data(spec)
    checks = harness.twin_checks(spec, x, target, strict_bits=True)
    assert [c.tier for c in checks] == ["bitwise"] * 3, [(c.name, c.tier) for c in checks]
    assert any(v.name == "norms.0.weight.grad" for v in checks[0].verdicts)
