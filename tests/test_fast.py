"""manual.fast.FastMLP: the same bits as the readable MLP.train_step and the autograd twin.

Every case trains three copies from the same parameters for a few steps — readable manual, fast
manual, twin (autograd + torch.optim) — and compares every loss and every final parameter by bits
(and, with momentum, the momentum buffers).  Sizes include widths and batches not divisible by
8/16 (vector tails) and one above 32768 elements (threaded elementwise kernels).
"""
import pytest
import torch

import manual
from manual.fast import CudaGraphStep, FastMLP
from manual.losses import target_kind
from manual.mlp import MLP, init_params
from refnet import twin as twin_mod


def bits(t):
    as_int = torch.int32 if t.dtype == torch.float32 else torch.int64
    return t.detach().cpu().contiguous().view(as_int)


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def data(n, sizes, dtype, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, sizes[0]), generator=gen, dtype=torch.float64)
    t = torch.randn((n, sizes[-1]), generator=gen, dtype=torch.float64)
    return x.to(dtype=dtype, device=device), t.to(dtype=dtype, device=device)


def build(sizes, act, bias, loss, opt, dtype, device="cpu"):
    params = init_params(sizes, act, bias, seed=3, dtype=dtype, device=device)
    clone = lambda: {k: v.clone() for k, v in params.items()}  # noqa: E731
    readable = MLP(clone(), act, loss, manual.make_optimizer(**opt))
    fast = FastMLP(MLP(clone(), act, loss, manual.make_optimizer(**opt)))
    twin = twin_mod.Twin(sizes, act, bias, dtype=dtype, device=device)
    twin_mod.load_params(twin, clone())
    settings = dict(opt)
    twin_opt = twin_mod.make_optimizer(twin, settings.pop("name"), **settings)
    return readable, fast, (twin, twin_mod.loss_module(loss), twin_opt)


def twin_step(twin, x, t):
    model, loss_fn, opt = twin
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), t)
    loss.backward()
    opt.step()
    return loss.detach()


CASES = [
    # (batch, sizes, activation, bias, loss, optimizer)
    (4, [2, 8, 1], "sigmoid", True, "sum_squared", {"name": "sgd", "lr": 0.5}),
    (13, [7, 19, 5], "sigmoid", False, "sum_squared", {"name": "sgd", "lr": 1e-3}),
    (37, [9, 23, 17, 3], "tanh", True, "mse", {"name": "sgd", "lr": 0.05, "momentum": 0.9}),
    (21, [5, 11, 6], "relu", True, "mse", {"name": "sgd", "lr": 0.05, "momentum": 0.9,
                                           "nesterov": True, "weight_decay": 1e-3}),
    (1, [3, 6, 2], "identity", True, "sum_squared",
     {"name": "sgd", "lr": 0.01, "momentum": 0.5, "dampening": 0.25}),
    (129, [33, 300, 7], "sigmoid", True, "mse", {"name": "sgd", "lr": 0.1, "momentum": 0.9}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[2]}-{'x'.join(map(str, c[1]))}-n{c[0]}")
def test_fast_step_is_bitwise_readable_and_twin(case, dtype):
    n, sizes, act, bias, loss, opt = case
    readable, fast, twin = build(sizes, act, bias, loss, opt, dtype)
    x, t = data(n, sizes, dtype)
    for step in range(4):
        lr_, lf, lt = readable.train_step(x, t), fast.train_step(x, t), twin_step(twin, x, t)
        assert same_bits(lf, lr_), f"step {step}: fast {lf.item()!r} != readable {lr_.item()!r}"
        assert same_bits(lf, lt), f"step {step}: fast loss {lf.item()!r} != twin {lt.item()!r}"
    final_twin = twin_mod.params_of(twin[0])
    for name, p in fast.mlp.params.items():
        assert same_bits(p, readable.params[name]), f"{name}: fast != readable"
        assert same_bits(p, final_twin[name]), f"{name}: fast != twin"
    for name, buf in readable.optimizer.buffers.items():
        assert same_bits(fast.mlp.optimizer.buffers[name], buf), f"momentum buffer {name}"


def test_losses_are_fresh_tensors_and_a_new_batch_size_rebuilds():
    readable, fast, _ = build([4, 9, 2], "sigmoid", True, "mse", {"name": "sgd", "lr": 0.1},
                              torch.float32)
    losses = []
    for n in (5, 5, 11, 5):
        x, t = data(n, [4, 9, 2], torch.float32, seed=n)
        losses.append(fast.train_step(x, t))
        assert same_bits(losses[-1], readable.train_step(x, t))
    assert len({id(v) for v in losses}) == 4 and not same_bits(losses[0], losses[1])


def test_fallback_and_foreign_optimizers_are_visible_and_bitwise(monkeypatch):
    """What the fast path does not specialise runs the readable code, visibly (specialised
    False, fallback naming why) and with the same bits; an optimizer that is not exactly one of
    manual.optim's runs its own step."""
    import manual.fast as fast_mod
    sizes, opt = [3, 8, 2], {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}
    params = init_params(sizes, "leaky_relu", True, seed=3, dtype=torch.float64)
    clone = lambda: {k: v.clone() for k, v in params.items()}  # noqa: E731
    readable = MLP(clone(), "leaky_relu", "mse", manual.make_optimizer(**opt), reg=0.01)
    fast = FastMLP(MLP(clone(), "leaky_relu", "mse", manual.make_optimizer(**opt), reg=0.01))
    assert fast.specialised and fast.fallback is None
    monkeypatch.setattr(fast_mod, "FAST_ACTIVATIONS", ("sigmoid", "tanh"))  # as if not written
    assert not fast.specialised and "leaky_relu" in fast.fallback
    x, t = data(6, sizes, torch.float64)
    for _ in range(3):
        assert same_bits(fast.train_step(x, t), readable.train_step(x, t))
    for name, p in fast.mlp.params.items():
        assert same_bits(p, readable.params[name])
    monkeypatch.undo()

    class Halving(manual.optim.SGD):   # a subclass: its step may differ, so it runs its own
        def step(self, params, grads):
            super().step(params, {k: g / 2 for k, g in grads.items()})
    a, b = (MLP(clone(), "tanh", "mse", Halving(lr=0.1)) for _ in range(2))
    fast = FastMLP(b)
    assert fast.specialised
    for _ in range(2):
        assert same_bits(fast.train_step(x, t), a.train_step(x, t))
    for name, p in b.params.items():
        assert same_bits(p, a.params[name])


# Every loss × optimizer pair, float32 and float64, batches around the nll cascade's boundaries
# (1, 15, 17, 255, 257); the hidden activations cycle so that every activation is exercised.
PAIR_OPTIMIZERS = [
    {"name": "sgd", "lr": 0.05},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "dampening": 0.1},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    {"name": "adam", "lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 1e-2},
    {"name": "adam", "lr": 3e-3, "amsgrad": True},
    {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1},
    {"name": "adamw", "lr": 3e-3, "amsgrad": True},
]
PAIR_ACTIVATIONS = [["relu", "leaky_relu"], ["elu", "maxout"], ["sigmoid", "tanh"],
                    ["maxout", "identity"], ["leaky_relu", "elu"]]
PAIR_LOSSES = ["sum_squared", "mse", "cross_entropy", "svm"]
PAIR_BATCHES = [1, 15, 17, 255, 257]


def _pair_target(loss, n, c, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if target_kind(loss) == "labels":
        return torch.randint(0, c, (n,), generator=gen)
    return torch.randn((n, c), generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("loss", PAIR_LOSSES)
@pytest.mark.parametrize("oi", range(len(PAIR_OPTIMIZERS)),
                         ids=[f"{o['name']}{i}" for i, o in enumerate(PAIR_OPTIMIZERS)])
def test_every_loss_and_optimizer_pair_is_bitwise(oi, loss, dtype):
    opt = PAIR_OPTIMIZERS[oi]
    sizes = [5, 12, 8, 4]
    for bi, n in enumerate(PAIR_BATCHES):
        acts = PAIR_ACTIVATIONS[(oi + bi + PAIR_LOSSES.index(loss)) % len(PAIR_ACTIVATIONS)]
        readable, fast, twin = build(sizes, acts, True, loss, opt, dtype)
        assert fast.specialised, fast.fallback
        # ELU's backward is ≤ 1 ulp from autograd's in the kernel's scalar tail (glibc exp; see
        # manual/kernel_exp.py and refnet/not_bitwise.py), so with ELU only fast == readable holds
        vs_twin = "elu" not in acts
        x, _ = data(n, sizes, dtype, seed=n)
        for step in range(3):
            t = _pair_target(loss, n, sizes[-1], dtype, seed=10 * n + step)
            lr_, lf, lt = readable.train_step(x, t), fast.train_step(x, t), twin_step(twin, x, t)
            where = f"{acts} n={n} step {step}"
            assert same_bits(lf, lr_), f"{where}: fast {lf.item()!r} != readable {lr_.item()!r}"
            assert same_bits(lf, lt) or not vs_twin, f"{where}: fast {lf.item()!r} != twin {lt.item()!r}"
        final_twin = twin_mod.params_of(twin[0])
        for name, p in fast.mlp.params.items():
            assert same_bits(p, readable.params[name]), f"{acts} n={n} {name}: fast != readable"
            assert same_bits(p, final_twin[name]) or not vs_twin, f"{acts} n={n} {name}: fast != twin"
        state_f, state_r = fast.mlp.optimizer.state_dict(), readable.optimizer.state_dict()
        for key, tensors in state_r.items():
            if isinstance(tensors, dict):
                for name, v in tensors.items():
                    got = state_f[key][name]
                    assert (same_bits(got, v) if isinstance(v, torch.Tensor) else got == v), \
                        f"{acts} n={n} optimizer state {key}[{name}]"


def test_bad_input_gets_the_readable_errors():
    _, fast, _ = build([3, 4, 2], "sigmoid", True, "mse", {"name": "sgd", "lr": 0.1}, torch.float32)
    x, t = data(5, [3, 4, 2], torch.float32)
    with pytest.raises(ValueError, match="x: expected shape"):
        fast.train_step(x[:, :2], t)
    with pytest.raises(TypeError, match="x: expected dtype"):
        fast.train_step(x.double(), t)
    with pytest.raises(ValueError, match="target: expected shape"):
        fast.train_step(x, t[:, :1])
    with pytest.raises(ValueError, match="non-empty"):
        fast.train_step(x[:0], t[:0])
    with pytest.raises(ValueError, match="optimizer"):
        FastMLP(MLP(init_params([3, 4, 2], dtype=torch.float32), "sigmoid", "mse"))
    # class labels: the same checks as the readable step (dtype, one per row), never a raw error
    _, fast_ce, _ = build([3, 4, 2], "relu", True, "cross_entropy", {"name": "sgd", "lr": 0.1},
                          torch.float32)
    labels = torch.tensor([0, 1, 1, 0, 1])
    with pytest.raises(TypeError, match="target: expected int64 class labels"):
        fast_ce.train_step(x, labels.to(torch.int32))
    with pytest.raises(ValueError, match="target: expected shape \\[5\\]"):
        fast_ce.train_step(x, labels[:4])
    with pytest.raises(ValueError, match="target: expected shape \\[5\\]"):
        fast_ce.train_step(x, labels.view(5, 1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_cuda_graph_step_equals_uncaptured(momentum):
    from refnet.settings import determinism
    opt = {"name": "sgd", "lr": 0.05, "momentum": momentum}
    sizes = [19, 70, 5]
    with determinism("cuda"):
        _, eager, _ = build(sizes, "tanh", True, "mse", opt, torch.float32, "cuda")
        _, captured, _ = build(sizes, "tanh", True, "mse", opt, torch.float32, "cuda")
        graph = CudaGraphStep(captured, *data(33, sizes, torch.float32, "cuda"))
        for step in range(5):
            x, t = data(33, sizes, torch.float32, "cuda", seed=10 + step)
            le, lg = eager.train_step(x, t), graph.train_step(x, t)
            assert same_bits(le, lg), f"step {step}: captured loss {lg.item()!r} != {le.item()!r}"
        torch.cuda.synchronize()
        for name, p in eager.mlp.params.items():
            assert same_bits(p, captured.mlp.params[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_relu_backward_bit_select_on_special_values(dtype):
    """The fast ReLU backward selects with integer ops on y's bits; at ±0, NaN, infinities and
    tiny values it gives activations.relu_backward's bits (where(y <= 0, +0, dy))."""
    from manual.activations import relu_backward, relu_forward
    from manual.fast import relu_backward_over
    tiny = torch.finfo(dtype).tiny / 4                    # subnormal
    z = torch.tensor([0.0, -0.0, 1.5, float("nan"), -2.0, float("-inf"), float("inf"), tiny,
                      -tiny, 3.0] * 7, dtype=dtype).view(7, 10)
    dy = torch.tensor([-1.0, 3.0, float("inf"), -2.0, -0.0, float("nan"), -4.0, -5.0, 6.0,
                       float("-inf")] * 7, dtype=dtype).view(7, 10).roll(1, 0)
    y, _ = relu_forward(z)
    expected = relu_backward(dy, y)
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    got = relu_backward_over(dy.clone(), y.clone().view(bits))
    assert same_bits(got, expected)


# -- every spec feature through the fast path and the readable path (issue 18) -----------------
OPTIMIZER_SETTINGS = [
    {"name": "sgd", "lr": 0.05},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
    {"name": "sgd", "lr": 0.05, "momentum": 0.5, "dampening": 0.25},
    {"name": "sgd", "lr": 0.05, "weight_decay": 1e-2},
    {"name": "adam", "lr": 1e-2},
    {"name": "adam", "lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 1e-2, "amsgrad": True},
    {"name": "adamw", "lr": 1e-2},
    {"name": "adamw", "lr": 1e-2, "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True},
]
FEATURE_CASES = [(act, loss, OPTIMIZER_SETTINGS[i % len(OPTIMIZER_SETTINGS)],
                  (0.0, 1e-2, 0.5)[i % 3], i % 2 == 0)
                 for i, (act, loss) in enumerate((a, lo) for a in sorted(manual.ACTIVATIONS)
                                                 for lo in sorted(manual.LOSSES))]
# every optimizer setting also with reg > 0 and with bias on and off on a specialised net
FEATURE_CASES += [(act, loss, opt, reg, bias) for opt in OPTIMIZER_SETTINGS
                  for act, loss, reg, bias in [("tanh", "mse", 0.5, False),
                                               ("relu", "sum_squared", 1e-2, True)]]


def _feature_case_id(c):
    opt = "-".join(f"{k}={v}" for k, v in c[2].items() if k != "lr")
    return f"{c[0]}-{c[1]}-{opt}-reg{c[3]}-{'bias' if c[4] else 'nobias'}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", FEATURE_CASES, ids=_feature_case_id)
def test_every_feature_fast_equals_readable_bitwise(case, dtype):
    act, loss, opt, reg, bias = case
    sizes = [5, 8, 6, 3]
    params = init_params(sizes, act, bias, seed=3, dtype=dtype)
    clone = lambda: {k: v.clone() for k, v in params.items()}  # noqa: E731
    settings = {k: v for k, v in opt.items() if k != "name"}
    readable = MLP(clone(), act, loss, manual.make_optimizer(opt["name"], **settings), reg=reg)
    fast = FastMLP(MLP(clone(), act, loss, manual.make_optimizer(opt["name"], **settings),
                       reg=reg))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn((11, sizes[0]), generator=gen, dtype=torch.float64).to(dtype)
    if manual.losses.target_kind(loss) == "labels":
        t = torch.randint(0, sizes[-1], (11,), generator=gen)
    else:
        t = torch.randn((11, sizes[-1]), generator=gen, dtype=torch.float64).to(dtype)
    for step in range(3):
        lr_, lf = readable.train_step(x, t), fast.train_step(x, t)
        assert same_bits(lf, lr_), f"step {step}: fast {lf.item()!r} != readable {lr_.item()!r}"
    for name, p in fast.mlp.params.items():
        assert same_bits(p, readable.params[name]), f"{name}: fast != readable"


def test_a_replaced_parameter_tensor_is_the_one_updated():
    readable, fast, _ = build([4, 7, 2], "tanh", True, "mse", {"name": "sgd", "lr": 0.1},
                              torch.float64)
    x, t = data(6, [4, 7, 2], torch.float64)
    assert same_bits(fast.train_step(x, t), readable.train_step(x, t))
    for name in list(fast.mlp.params):   # swap every tensor for a copy (as a checkpoint load may)
        fast.mlp.params[name] = fast.mlp.params[name].clone()
    for _ in range(2):
        assert same_bits(fast.train_step(x, t), readable.train_step(x, t))
    for name, p in fast.mlp.params.items():
        assert same_bits(p, readable.params[name]), name


# -- CudaGraphStep: what it refuses, and when its graph is stale (checked without a GPU) ------------
@pytest.mark.parametrize("opt", [{"name": "adam", "lr": 1e-3}, {"name": "adamw", "lr": 1e-3}])
def test_graph_capture_refuses_adam(opt):
    _, fast, _ = build([3, 4, 2], "tanh", True, "mse", opt, torch.float32)
    x, t = data(5, [3, 4, 2], torch.float32)
    with pytest.raises(ValueError, match="optimizer: graph capture supports manual.optim.SGD only"):
        CudaGraphStep(fast, x, t)


def test_graph_capture_refuses_what_is_not_a_fast_step():
    x, t = data(5, [3, 4, 2], torch.float32)
    readable, _, _ = build([3, 4, 2], "tanh", True, "mse", {"name": "sgd", "lr": 0.1},
                           torch.float32)
    with pytest.raises(TypeError, match="fast: expected a manual.fast.FastMLP, got MLP"):
        CudaGraphStep(readable, x, t)


@pytest.mark.parametrize("layer", ["batchnorm", "dropout", "embedding"])
def test_graph_capture_refuses_the_optional_layers(layer):
    _, fast, x, t = _layer_net(layer, "mse", OPTIMIZER_SETTINGS[0], torch.float32, 5, "tanh")
    with pytest.raises(ValueError, match="fast: graph capture does not cover norm, dropout"):
        CudaGraphStep(fast, x, t)


def test_graph_capture_refuses_the_readable_fallback():
    _, fast, _ = build([3, 4, 2], "elu", True, "mse", {"name": "sgd", "lr": 0.1}, torch.float32)
    x, t = data(5, [3, 4, 2], torch.float32)
    with pytest.raises(ValueError, match="fast: graph capture needs a specialised FastMLP"):
        CudaGraphStep(fast, x, t)


def test_graph_state_sees_what_makes_a_graph_stale():
    from manual.cuda_graph import graph_state
    _, fast, _ = build([3, 4, 2], "tanh", True, "mse",
                       {"name": "sgd", "lr": 0.1, "momentum": 0.9}, torch.float32)
    x, t = data(5, [3, 4, 2], torch.float32)
    fast.train_step(x, t)
    state = graph_state(fast)
    fast.train_step(x, t)                                   # an ordinary step: in place, not stale
    assert graph_state(fast) == state
    opt = fast.mlp.optimizer
    opt.load_state_dict(opt.state_dict())                   # new buffer tensors
    assert graph_state(fast) != state
    state = graph_state(fast)
    fast.mlp.params["layers.0.weight"] = fast.mlp.params["layers.0.weight"].clone()
    assert graph_state(fast) != state
    state = graph_state(fast)
    opt.lr = 0.01
    assert graph_state(fast) != state


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_refuses_a_stale_graph_and_reset_recaptures():
    from refnet.settings import determinism
    opt = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
    sizes = [19, 70, 5]
    with determinism("cuda"):
        _, eager, _ = build(sizes, "relu", True, "mse", opt, torch.float32, "cuda")
        _, captured, _ = build(sizes, "relu", True, "mse", opt, torch.float32, "cuda")
        graph = CudaGraphStep(captured, *data(33, sizes, torch.float32, "cuda"))
        x, t = data(33, sizes, torch.float32, "cuda", seed=5)
        for _ in range(3):
            assert same_bits(eager.train_step(x, t), graph.train_step(x, t))
        for side in (eager, captured):
            side.mlp.optimizer.load_state_dict(side.mlp.optimizer.state_dict())
        with pytest.raises(ValueError, match="call reset"):
            graph.train_step(x, t)
        graph.reset()
        for _ in range(3):
            assert same_bits(eager.train_step(x, t), graph.train_step(x, t))
        torch.cuda.synchronize()
        for name, p in eager.mlp.params.items():
            assert same_bits(p, captured.mlp.params[name]), name
        for name, b in eager.mlp.optimizer.buffers.items():
            assert same_bits(b, captured.mlp.optimizer.buffers[name]), name


# every optional layer × loss × optimizer setting: the specialised step equals the readable one
LAYERS = {
    "batchnorm": dict(norm="batchnorm"),
    "batchnorm_eval": dict(norm="batchnorm", training=False),
    "layernorm": dict(norm="layernorm"),
    "dropout": dict(dropout=0.3),
    "dropout_eval": dict(dropout=0.3, training=False),
    "embedding": dict(embedding={"vocab": 11, "dim": 3, "context": 4}),
    "makemore": dict(norm="batchnorm", embedding={"vocab": 27, "dim": 10, "context": 3}),
}
LAYER_BATCHES = [9, 17, 32]   # around the 8/4-lane widths and their tails


def _layer_net(layer, loss, opt, dtype, n, act):
    """Readable and fast MLPs with the optional layer(s), from the same parameters, and a batch."""
    settings = dict(LAYERS[layer])
    training = settings.pop("training", True)
    emb = settings.get("embedding")
    sizes = [emb["context"] * emb["dim"] if emb else 5, 13, 6, 4]
    params = init_params(sizes, act, True, seed=3, dtype=dtype, norm=settings.get("norm"),
                         embedding=emb)
    nets = []
    for _ in range(2):
        opt_args = {k: v for k, v in opt.items() if k != "name"}
        mlp = MLP({k: v.clone() for k, v in params.items()}, act, loss,
                  manual.make_optimizer(opt["name"], **opt_args),
                  generator=torch.Generator().manual_seed(5), **settings)
        if not training:
            for name, buf in mlp.buffers.items():   # running statistics away from 0 and 1
                if buf.is_floating_point():
                    buf.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
        nets.append(mlp.train(training))
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(0, emb["vocab"], (n, emb["context"]), generator=gen) if emb else \
        torch.randn((n, sizes[0]), generator=gen, dtype=torch.float64).mul_(3).to(dtype)
    if target_kind(loss) == "labels":
        t = torch.randint(0, sizes[-1], (n,), generator=gen)
    else:
        t = torch.randn((n, sizes[-1]), generator=gen, dtype=torch.float64).to(dtype)
    return nets[0], FastMLP(nets[1]), x, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("oi", range(len(OPTIMIZER_SETTINGS)))
@pytest.mark.parametrize("loss", sorted(manual.LOSSES))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_every_layer_loss_and_optimizer_fast_equals_readable(layer, loss, oi, dtype):
    acts = sorted(manual.ACTIVATIONS)
    for bi, n in enumerate(LAYER_BATCHES):
        act = acts[(oi + bi + len(layer)) % len(acts)]
        readable, fast, x, t = _layer_net(layer, loss, OPTIMIZER_SETTINGS[oi], dtype, n, act)
        for step in range(3):
            lr_, lf = readable.train_step(x, t), fast.train_step(x, t)
            assert fast.specialised, fast.fallback
            assert same_bits(lf, lr_), f"{act} n={n} step {step}: fast {lf!r} != readable {lr_!r}"
        for name, p in fast.mlp.params.items():
            assert same_bits(p, readable.params[name]), f"{act} n={n} {name}: fast != readable"
        for name, b in fast.mlp.buffers.items():
            assert torch.equal(b, readable.buffers[name]), f"{act} n={n} buffer {name}"


@pytest.mark.parametrize("layer", ["batchnorm", "layernorm", "makemore"])
def test_optional_layers_bitwise_at_two_threads_and_after_a_thread_change(layer):
    before = torch.get_num_threads()
    try:
        readable, fast, x, t = _layer_net(layer, "cross_entropy", OPTIMIZER_SETTINGS[0],
                                          torch.float32, 33, "tanh")
        for threads in (2, 2, 1, 2):   # the batch norm sums' chunks follow the thread count
            torch.set_num_threads(threads)
            assert same_bits(fast.train_step(x, t), readable.train_step(x, t)), threads
        for name, p in fast.mlp.params.items():
            assert same_bits(p, readable.params[name]), name
    finally:
        torch.set_num_threads(before)


def test_optional_layers_are_bitwise_with_the_twin():
    # makemore's net (embedding, batch norm, tanh, cross-entropy, SGD) against autograd too
    opt = {"name": "sgd", "lr": 0.1}
    readable, fast, x, t = _layer_net("makemore", "cross_entropy", opt, torch.float32, 32, "tanh")
    emb = LAYERS["makemore"]["embedding"]
    twin = twin_mod.Twin([30, 13, 6, 4], "tanh", True, dtype=torch.float32, norm="batchnorm",
                         embedding=emb)
    twin_mod.load_params(twin, {k: v.clone() for k, v in readable.params.items()})
    twin_opt = twin_mod.make_optimizer(twin, "sgd", lr=0.1)
    for step in range(3):
        lt = twin_step((twin, twin_mod.loss_module("cross_entropy"), twin_opt), x, t)
        assert same_bits(fast.train_step(x, t), lt), step
    final = twin_mod.params_of(twin)
    for name, p in fast.mlp.params.items():
        assert same_bits(p, final[name]), name


def test_tokens_written_in_place_are_checked_and_looked_up_again():
    readable, fast, x, t = _layer_net("embedding", "mse", OPTIMIZER_SETTINGS[0], torch.float32, 9,
                                      "tanh")
    assert same_bits(fast.train_step(x, t), readable.train_step(x, t))
    x[0, 0] = (x[0, 0] + 1) % 11                          # in place: new values, same tensor
    assert same_bits(fast.train_step(x, t), readable.train_step(x, t))
    x[1, 1] = 11                                          # out of range, in place
    with pytest.raises(ValueError, match=r"x: token indices must lie in \[0, 11\)"):
        fast.train_step(x, t)


def test_cross_entropy_with_saturated_log_probabilities_is_bitwise():
    """Logits thousands apart: most log-probabilities lie far below −104, where the fast float32
    exp clamps its input (SleefExpFloat32) and must still give the kernel's +0 (and its values
    just above −104 unchanged); fast == readable == twin."""
    sizes, opt = [5, 12, 4], {"name": "sgd", "lr": 1e-4}
    readable, fast, twin = build(sizes, "relu", True, "cross_entropy", opt, torch.float32)
    for net in (readable.params, fast.mlp.params):
        net["layers.1.weight"].mul_(400)
    with torch.no_grad():
        twin[0].layers[1].weight.mul_(400)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn((37, 5), generator=gen).mul_(5)
    t = torch.randint(0, 4, (37,), generator=gen)
    logp = torch.log_softmax(readable.predict(x)[0], 1)
    assert bool((logp < -105).any()), "the case must reach the clamped range"
    for step in range(3):
        lr_, lf, lt = readable.train_step(x, t), fast.train_step(x, t), twin_step(twin, x, t)
        assert same_bits(lf, lr_) and same_bits(lf, lt), (step, lf.item(), lr_.item(), lt.item())
    final_twin = twin_mod.params_of(twin[0])
    for name, p in fast.mlp.params.items():
        assert same_bits(p, readable.params[name]) and same_bits(p, final_twin[name]), name


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
@pytest.mark.parametrize("width", [45, 300])
def test_norm_layers_over_several_lane_chunks_are_bitwise(norm, width, threads):
    """Hidden widths of several 8-lane chunks (45: five and a tail of 5; 300: 37 and a tail of 4,
    more than the 16 a blocked sum would keep in order), where LnRowSums'
    index_add_ over chunks and the fold run, at 1 and 2 threads (ChunkedColumnSums' steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sizes = [7, width, 5]
        params = init_params(sizes, "tanh", True, seed=4, dtype=torch.float32, norm=norm)
        nets = [MLP({k: v.clone() for k, v in params.items()}, "tanh", "cross_entropy",
                    manual.make_optimizer("adam", lr=1e-2), norm=norm) for _ in range(2)]
        fast = FastMLP(nets[1])
        gen = torch.Generator().manual_seed(width)
        x = torch.randn((33, 7), generator=gen).mul_(3)
        t = torch.randint(0, 5, (33,), generator=gen)
        for step in range(3):
            assert same_bits(fast.train_step(x, t), nets[0].train_step(x, t)), step
        for name, p in fast.mlp.params.items():
            assert same_bits(p, nets[0].params[name]), name
    finally:
        torch.set_num_threads(before)
