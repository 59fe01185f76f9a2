"""manual/ imports torch and math only, and never uses autograd.

Three parts:
  runtime  every manual op, every MLP configuration and the fast path run forward, backward and
           step with autograd made to raise (``no_autograd``) on inputs that do not require grad;
           no result may carry a grad_fn or require grad;
  static   every file of manual/, recursively, is scanned for autograd names and aten backward
           kernels, in code and in string literals (docstrings and comments excepted);
  planted  both are shown to fail on autograd reached by getattr, by an alias, through
           torch.nn.Parameter, through an aten backward kernel and through Tensor.backward.

The guard ``no_autograd`` has three layers, each able to catch on its own:
  patches   torch.Tensor.backward, torch.Tensor.requires_grad_, torch.autograd.grad/backward,
            torch.autograd.Function.apply, torch.nn.Parameter.__new__ and the autograd engine
            (Variable._execution_engine) raise;
  function  a TorchFunctionMode raises on any call that asks for gradients (requires_grad_,
            setting .requires_grad, autograd functions, anything named *backward*) and on any
            result that requires grad or carries a grad_fn;
  dispatch  a TorchDispatchMode raises on every aten op whose name holds "backward" or a
            forward-AD dual op, however it was reached (torch.ops.aten.X, getattr, F.*).
"""
import ast
import contextlib
import pathlib
import shutil

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import manual
from manual import dropout, embedding, gates, layers, losses, mlp as mlp_mod, norm
from manual.activations import ACTIVATIONS
from manual.fast import FastMLP
from manual.mlp import MLP, init_params

MANUAL = pathlib.Path(manual.__file__).resolve().parent
LAYERS = ("patches", "function", "dispatch")


# -- the runtime guard -----------------------------------------------------------------------------
class AutogradUsed(AssertionError):
    """manual/ reached autograd."""


def _raiser(what):
    def raise_(*args, **kwargs):
        raise AutogradUsed(f"autograd used in manual/: {what}")
    return raise_


class _Engine:
    """Stands in for the autograd engine: any use raises."""

    def __getattr__(self, name):
        raise AutogradUsed(f"autograd used in manual/: the autograd engine ({name})")


_DUAL_OPS = ("_make_dual", "_unpack_dual", "_fw_primal")


class _FunctionGuard(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", repr(func))
        module = getattr(func, "__module__", "") or ""
        if name == "__set__":  # an attribute set: name the attribute
            name = f"set .{getattr(getattr(func, '__self__', None), '__name__', '?')}"
        if name in ("requires_grad_", "grad", "set .requires_grad", "set .grad") \
                or "backward" in name or module.startswith("torch.autograd"):
            raise AutogradUsed(f"autograd used in manual/: torch function {name}")
        result = func(*args, **(kwargs or {}))
        bad = _grad_carriers(result)
        if bad:
            raise AutogradUsed(f"autograd used in manual/: {name} returned {bad[0]}")
        return result


class _DispatchGuard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if "backward" in name or any(d in name for d in _DUAL_OPS):
            raise AutogradUsed(f"autograd used in manual/: aten op {name}")
        return func(*args, **(kwargs or {}))


def _grad_carriers(obj, where="result"):
    """Descriptions of the tensors in obj (nested tuples, lists, dicts) that carry autograd."""
    if isinstance(obj, torch.Tensor):
        if obj.grad_fn is not None or obj.requires_grad:
            return [f"{where} with grad_fn={obj.grad_fn}, requires_grad={obj.requires_grad}"]
        return []
    if isinstance(obj, dict):
        return [b for k, v in obj.items() for b in _grad_carriers(v, f"{where}[{k!r}]")]
    if isinstance(obj, (list, tuple)):
        return [b for i, v in enumerate(obj) for b in _grad_carriers(v, f"{where}[{i}]")]
    return []


_MISSING = object()


def _restore(saved):
    for obj, attr, old in saved:
        if old is _MISSING:       # inherited (Tensor.requires_grad_ lives on TensorBase)
            if attr in obj.__dict__:
                delattr(obj, attr)
        else:
            setattr(obj, attr, old)


@contextlib.contextmanager
def no_autograd(layers=LAYERS):
    """Autograd made to raise AutogradUsed, by the chosen layers (all three by default)."""
    patches = []
    if "patches" in layers:
        variable = torch.autograd.variable.Variable
        patches = [(torch.Tensor, "backward", _raiser("Tensor.backward")),
                   (torch.Tensor, "requires_grad_", _raiser("Tensor.requires_grad_")),
                   (torch.autograd, "grad", _raiser("torch.autograd.grad")),
                   (torch.autograd, "backward", _raiser("torch.autograd.backward")),
                   (torch.autograd.Function, "apply",
                    classmethod(_raiser("torch.autograd.Function.apply"))),
                   (torch.nn.Parameter, "__new__", staticmethod(_raiser("torch.nn.Parameter"))),
                   (variable, "_execution_engine", _Engine())]
    saved = [(obj, attr, obj.__dict__.get(attr, _MISSING)) for obj, attr, _ in patches]
    with contextlib.ExitStack() as stack:
        stack.callback(_restore, saved)
        for obj, attr, new in patches:
            setattr(obj, attr, new)
        if "function" in layers:
            stack.enter_context(_FunctionGuard())
        if "dispatch" in layers:
            stack.enter_context(_DispatchGuard())
        yield


def _assert_plain(result, what):
    bad = _grad_carriers(result)
    assert not bad, f"{what}: {bad[0]}"


# -- runtime: every op ------------------------------------------------------------------------------
OPTIMIZERS = [("sgd", {"lr": 0.1}), ("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1}),
              ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
              ("adam", {"lr": 0.01}), ("adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01}),
              ("adamw", {"lr": 0.01}), ("adamw", {"lr": 0.01, "amsgrad": True})]
ACT_OPTIONS = {"leaky_relu": {"slope": 0.2}, "elu": {"alpha": 0.5}, "maxout": {"k": 2}}
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])]


def _randn(*shape, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)


def _labels(n, c, device="cpu", seed=0):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_every_op_runs_without_autograd(device):
    a, b, dout = (_randn(4, 6, device=device, seed=s) for s in (1, 2, 3))
    a[0, :3] = b[0, :3]                      # ties for the max gates
    a[1, 0] = 0.0                            # kinks for the activations
    x, w, bias = _randn(5, 3, device=device, seed=4), _randn(4, 3, device=device, seed=5), \
        _randn(4, device=device, seed=6)
    results = []
    with no_autograd():
        for fwd, bwd in ((gates.add_forward, gates.add_backward),
                         (gates.mul_forward, gates.mul_backward),
                         (gates.maximum_forward, gates.maximum_backward)):
            out, cache = fwd(a, b)
            results += [out, bwd(dout, cache)]
        for dim in (0, 1):
            for fwd, bwd in ((gates.max_dim_forward, gates.max_dim_backward),
                             (gates.amax_forward, gates.amax_backward)):
                out, cache = fwd(a, dim)
                results += [out, bwd(dout.sum(dim), cache)]
        uses, n = gates.copy_forward(a, 3)
        results += [uses, gates.copy_backward([dout] * n)]
        for bias_or_none in (bias, None):
            out, cache = layers.linear_forward(x, w, bias_or_none)
            results += [out, layers.linear_backward(_randn(5, 4, device=device), cache)]
        for name in ACTIVATIONS:
            out, cache = manual.activation_forward(name, a, **ACT_OPTIONS.get(name, {}))
            results += [out, manual.activation_backward(name, torch.ones_like(out), cache)]
        one = torch.ones((), dtype=a.dtype, device=device)
        for name, (_, _, kind) in manual.LOSSES.items():
            target = b if kind == "values" else _labels(4, 6, device)
            loss, cache = manual.loss_forward(name, a, target)
            results += [loss, manual.loss_backward(name, one, cache)]
        results += [losses.l2_forward([a, w], 0.1), losses.l2_backward(one, [a, w], 0.1)]
        for name, settings in OPTIMIZERS:
            params, grads = {"w": w.clone(), "b": bias.clone()}, {"w": w * 0.5, "b": bias * 0.5}
            opt = manual.make_optimizer(name, **settings)
            for _ in range(3):
                opt.step(params, grads)
            results += [params, opt.state_dict()]
    _assert_plain(results, "manual op results")


def _two_steps(net, x, target):
    """Two rounds of traced forward, backward and step, then train_step: every result."""
    results = []
    for _ in range(2):
        trace = {}
        value, cache = net.forward(x, target, trace=trace)
        grads, dx = net.backward(cache, trace=trace)
        net.step(grads)
        results += [value, grads, dx, trace, net.train_step(x, target)]
    return results


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", list(manual.LOSSES))
def test_every_mlp_runs_without_autograd(loss, device):
    """Every activation × this loss × every optimizer: forward (traced), backward, step."""
    kind = losses.target_kind(loss)
    x = _randn(7, 4, device=device, seed=1)
    target = _randn(7, 3, device=device, seed=2) if kind == "values" else _labels(7, 3, device)
    for act in ACTIVATIONS:
        for (opt_name, settings), reg in zip(OPTIMIZERS, (0.0, 0.01) * 4):
            params = init_params([4, 6, 3], act, device=device)
            net = MLP(params, act, loss, manual.make_optimizer(opt_name, **settings), reg=reg,
                      **{k: v for k, v in ACT_OPTIONS.get(act, {}).items()})
            with no_autograd():
                results = _two_steps(net, x, target)
            _assert_plain([results, net.params, net.optimizer.state_dict()],
                          f"MLP({act}, {loss}, {opt_name} {settings})")


@pytest.mark.parametrize("device", DEVICES)
def test_norm_dropout_embedding_ops_run_without_autograd(device):
    """Batch norm (fused, textbook and step-by-step, training and eval), layer norm (fused and
    textbook), cross-entropy's textbook backward, dropout, embedding."""
    x, dout = _randn(6, 5, device=device, seed=1), _randn(6, 5, device=device, seed=2)
    w, b = _randn(5, device=device, seed=3), _randn(5, device=device, seed=4)
    idx = _labels(12, 7, device).view(4, 3)
    table, demb = _randn(7, 2, device=device, seed=5), _randn(4, 3, 2, device=device, seed=6)
    results = []
    with no_autograd():
        rm, rv = torch.zeros_like(w), torch.ones_like(w)
        for training in (True, False):
            out, cache = norm.batchnorm_forward(x, w, b, rm, rv, training=training,
                                                num_batches_tracked=torch.tensor(0, device=device))
            results += [out, norm.batchnorm_backward(dout, cache), rm, rv,
                        norm.batchnorm_backward_textbook(dout, cache)]
        out, cache = norm.batchnorm_forward_steps(x, w, b)
        results += [out, norm.batchnorm_backward_steps(dout, cache)]
        out, cache = norm.layernorm_forward(x, w, b)
        results += [out, norm.layernorm_backward(dout, cache),
                    norm.layernorm_backward_textbook(dout, cache)]
        _, cache = losses.cross_entropy_forward(x, _labels(6, 5, device))
        dloss = torch.ones((), dtype=x.dtype, device=device)
        results.append(losses.cross_entropy_backward_textbook(dloss, cache))
        gen = torch.Generator(device=device).manual_seed(0)
        for p in (0.0, 0.3):
            out, cache = dropout.dropout_forward(x, p, generator=gen)
            results += [out, dropout.dropout_backward(dout, cache)]
        out, cache = embedding.embedding_forward(idx, table)
        results += [out, embedding.embedding_backward(demb, cache)]
    _assert_plain(results, "norm/dropout/embedding op results")


LAYER_CONFIGS = [{"norm": "batchnorm"}, {"norm": "layernorm"}, {"dropout": 0.25},
                 {"norm": "batchnorm", "dropout": 0.25},
                 {"norm": "batchnorm", "embedding": {"vocab": 7, "dim": 2, "context": 2}}]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", LAYER_CONFIGS, ids=lambda c: "+".join(c))
def test_mlp_with_norm_dropout_embedding_runs_without_autograd(config, device):
    """An MLP with the optional layers: traced forward, backward, step, train_step, then eval."""
    emb = config.get("embedding")
    x = _labels(8, 7, device).view(4, 2) if emb else _randn(4, 4, device=device, seed=1)
    sizes = [4, 6, 5, 3]
    target = _labels(4, 3, device)
    params = init_params(sizes, "relu", device=device, norm=config.get("norm"), embedding=emb)
    net = MLP(params, "relu", "cross_entropy", manual.make_optimizer("sgd", lr=0.1), reg=0.01,
              **config, generator=torch.Generator(device=device).manual_seed(0))
    with no_autograd():
        results = _two_steps(net, x, target)
        net.eval()
        results.append(net.predict(x)[0])
    _assert_plain([results, net.params, net.buffers], f"MLP({config})")


@pytest.mark.parametrize("device", DEVICES)
def test_fast_path_runs_without_autograd(device):
    """FastMLP's specialised step (every fast activation × loss × SGD form) and its fallbacks."""
    x = _randn(9, 4, device=device, seed=1)
    for act in ACTIVATIONS:
        for loss in manual.LOSSES:
            kind = losses.target_kind(loss)
            target = _randn(9, 3, device=device, seed=2) if kind == "values" else _labels(9, 3, device)
            for opt_name, settings in OPTIMIZERS:
                net = MLP(init_params([4, 6, 3], act, device=device), act, loss,
                          manual.make_optimizer(opt_name, **settings))
                fast = FastMLP(net)
                with no_autograd():
                    results = [fast.train_step(x, target) for _ in range(3)]
                _assert_plain([results, fast.grads, net.params],
                              f"FastMLP({act}, {loss}, {opt_name} {settings})")


def test_inputs_of_the_runtime_checks_do_not_require_grad():
    # the runtime checks above are only meaningful on plain inputs: make sure the helpers give those
    assert not _randn(2, 2).requires_grad and not any(
        t.requires_grad for t in init_params([2, 3, 1]).values())


# -- static scan ------------------------------------------------------------------------------------
FORBIDDEN_NAMES = {"autograd", "grad_fn", "requires_grad", "requires_grad_", "enable_grad",
                   "set_grad_enabled", "Parameter", "functorch", "_execution_engine",
                   "_make_dual", "_unpack_dual", "eval", "exec", "__import__", "importlib"}
FORBIDDEN_TORCH_ATTRS = {"ops", "func", "nn.Parameter"}      # torch.ops, torch.func
FORBIDDEN_IN_STRINGS = ("autograd", "backward", "grad_fn", "requires_grad", "Parameter",
                        "functorch", "_execution_engine", "_dual")
FORBIDDEN_STRINGS = {"grad", "ops", "func"}
FORBIDDEN_BYTES = (b"autograd", b"backward", b"grad_fn", b"requires_grad")


def _torch_aliases(tree):
    """Names bound to torch or anything imported from it."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "torch":
                    names.add(a.asname or "torch")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            names.update(a.asname or a.name for a in node.names)
    return names


def _root(node):
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def scan_source(source, filename="<source>"):
    """Problems found in one Python source: a list of 'file:line: what' strings."""
    tree = ast.parse(source, filename)
    torch_names = _torch_aliases(tree)
    # Strings that cannot name an attribute: docstrings (bare, inert), dict keys and subscripts
    # (fast.py's plan["backward"]) and the names listed in __all__.  Strings anywhere else, e.g.
    # passed to getattr or bound to a variable, are scanned.
    inert = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Expr):
            inert.add(id(n.value))
        elif isinstance(n, ast.Dict):
            inert.update(id(k) for k in n.keys if k is not None)
        elif isinstance(n, ast.Subscript):
            inert.add(id(n.slice))
        elif isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                               for t in n.targets):
            inert.update(id(e) for e in getattr(n.value, "elts", ()))
    found = []

    def flag(node, what):
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
            flag(node, f"name {node.id}")
        elif isinstance(node, ast.Attribute):
            if node.attr in FORBIDDEN_NAMES or node.attr == "grad":
                flag(node, f"attribute .{node.attr}")
            elif _root(node) in torch_names and ("backward" in node.attr
                                                 or node.attr in FORBIDDEN_TORCH_ATTRS):
                flag(node, f"torch attribute .{node.attr}")
        elif isinstance(node, ast.alias):
            if any(part in FORBIDDEN_NAMES or "backward" in part and "torch" in node.name
                   for part in node.name.split(".")):
                flag(node, f"import {node.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            for a in node.names:
                if "backward" in a.name or a.name in FORBIDDEN_NAMES | FORBIDDEN_TORCH_ATTRS:
                    flag(node, f"from {node.module} import {a.name}")
        elif isinstance(node, ast.keyword) and node.arg in FORBIDDEN_NAMES:
            flag(node, f"keyword {node.arg}=")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "getattr" and node.args and _root(node.args[0]) in torch_names:
            flag(node, "getattr on torch")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in inert:
            text = node.value
            if text in FORBIDDEN_STRINGS or any(f in text for f in FORBIDDEN_IN_STRINGS):
                flag(node, f"string {text!r}")
    return found


def scan_folder(folder):
    """Every file under folder, recursively: Python sources by scan_source, other files by bytes.
    __pycache__ is skipped: Python loads a cached .pyc only beside its scanned source."""
    files = [p for p in sorted(pathlib.Path(folder).rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts]
    assert files, f"{folder} has no files"
    found = []
    for path in files:
        rel = path.relative_to(folder)
        if path.suffix == ".py":
            found += scan_source(path.read_text(), str(rel))
        else:
            data = path.read_bytes()
            found += [f"{rel}: bytes {b!r}" for b in FORBIDDEN_BYTES if b in data]
    return found


def test_imports_are_torch_math_or_manual():
    for path in sorted(MANUAL.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for n in names:
                root = n.split(".")[0]
                assert root in ("torch", "math", "manual"), f"{path.name} imports {n}"


def test_static_scan_of_every_file_in_manual():
    assert scan_folder(MANUAL) == []


# -- planted: both guards fail on real autograd ------------------------------------------------------
def _leaves(x, weight):
    """Copies of x and weight, and a zero bias, that require grad (set as an attribute)."""
    leaves = (x.detach().clone(), weight.detach().clone(),
              torch.zeros(weight.shape[0], dtype=x.dtype, device=x.device))
    for t in leaves:
        t.requires_grad = True
    return leaves


def planted_getattr(dout, cache):
    """linear_backward by autograd reached through getattr."""
    x, weight, has_bias = cache
    xg, wg, bg = _leaves(x, weight)
    out = torch.addmm(bg, xg, wg.t()) if has_bias else xg.mm(wg.t())
    inputs = (xg, wg, bg) if has_bias else (xg, wg)
    grads = getattr(torch, "autograd").grad(out, inputs, dout)
    return grads[0], grads[1], grads[2] if has_bias else None


def planted_alias(dout, cache):
    """linear_backward by autograd reached through an alias."""
    x, weight, has_bias = cache
    g = torch.autograd
    xg, wg, bg = _leaves(x, weight)
    out = torch.addmm(bg, xg, wg.t()) if has_bias else xg.mm(wg.t())
    grads = g.grad(out, (xg, wg, bg) if has_bias else (xg, wg), dout)
    return grads[0], grads[1], grads[2] if has_bias else None


def planted_parameter(dout, cache):
    """linear_backward through torch.nn.Parameter and Tensor.backward."""
    x, weight, has_bias = cache
    xg, wg = torch.nn.Parameter(x.detach().clone()), torch.nn.Parameter(weight.detach().clone())
    bg = torch.nn.Parameter(torch.zeros(weight.shape[0], dtype=x.dtype, device=x.device))
    out = torch.addmm(bg, xg, wg.t()) if has_bias else xg.mm(wg.t())
    out.backward(dout)
    return xg.grad, wg.grad, bg.grad if has_bias else None


PLANTS = {"getattr": planted_getattr, "alias": planted_alias, "parameter": planted_parameter}


def _run_mlp(loss="sum_squared"):
    net = MLP(init_params([3, 5, 2], "tanh"), "tanh", loss, manual.make_optimizer("sgd", lr=0.1))
    value, cache = net.forward(_randn(6, 3, seed=1), _randn(6, 2, seed=2))
    return net.backward(cache)


@pytest.mark.parametrize("plant", list(PLANTS))
def test_plants_are_real_autograd_and_bit_identical(plant, monkeypatch):
    """Without the guard a planted linear_backward passes every bitwise comparison: only the
    guard can tell it from the hand-written one."""
    want = _run_mlp()
    monkeypatch.setattr(mlp_mod, "linear_backward", PLANTS[plant])
    got = _run_mlp()
    for name in want[0]:
        assert torch.equal(want[0][name], got[0][name]), name
    assert torch.equal(want[1].detach(), got[1].detach())


EXPECTED = {  # plant -> layer -> what that layer reports (the first use it meets)
    "getattr": {"patches": "torch.autograd.grad", "function": "torch function set .requires_grad",
                "all": "torch function set .requires_grad"},
    "alias": {"patches": "torch.autograd.grad", "function": "torch function set .requires_grad",
              "all": "torch function set .requires_grad"},
    "parameter": {"patches": "torch.nn.Parameter", "function": "returned",
                  "all": "torch.nn.Parameter"},
}


@pytest.mark.parametrize("layer", ["all", "patches", "function"])
@pytest.mark.parametrize("plant", list(PLANTS))
def test_the_guard_catches_each_plant(plant, layer, monkeypatch):
    monkeypatch.setattr(mlp_mod, "linear_backward", PLANTS[plant])
    with pytest.raises(AutogradUsed) as caught:
        with no_autograd(LAYERS if layer == "all" else (layer,)):
            _run_mlp()
    print(f"{plant} / {layer}: {caught.value}")
    assert EXPECTED[plant][layer] in str(caught.value)


def test_the_guard_catches_aten_backward_kernels_and_tensor_backward(monkeypatch):
    def sigmoid_backward_by_kernel(dout, y):
        return getattr(getattr(torch, "ops").aten, "sigmoid_backward")(dout, y)

    def loss_backward_by_tensor_backward(name, dloss, cache):
        getattr(dloss, "backward")()

    monkeypatch.setitem(ACTIVATIONS, "sigmoid", (ACTIVATIONS["sigmoid"][0],
                                                 sigmoid_backward_by_kernel, ()))
    net = MLP(init_params([3, 5, 2]), "sigmoid")
    x, t = _randn(6, 3, seed=1), _randn(6, 2, seed=2)
    for layer, expect in (("dispatch", "aten op aten::sigmoid_backward"),
                          ("function", "torch function sigmoid_backward")):
        with pytest.raises(AutogradUsed, match=expect) as caught:
            with no_autograd((layer,)):
                net.backward(net.forward(x, t)[1])
        print(f"aten kernel / {layer}: {caught.value}")
    monkeypatch.setattr(mlp_mod, "loss_backward", loss_backward_by_tensor_backward)
    with pytest.raises(AutogradUsed, match="Tensor.backward") as caught:
        with no_autograd(("patches",)):
            net.backward(net.forward(x, t)[1])
    print(f"Tensor.backward / patches: {caught.value}")


def test_the_guard_leaves_torch_as_it_was():
    before = (torch.Tensor.backward, torch.autograd.grad, torch.nn.Parameter.__new__)
    with pytest.raises(AutogradUsed):
        with no_autograd():
            torch.autograd.grad(None, None)
    assert (torch.Tensor.backward, torch.autograd.grad, torch.nn.Parameter.__new__) == before
    w = torch.ones(2, requires_grad=True)
    (w * w).sum().backward()
    assert torch.equal(w.grad, torch.full((2,), 2.0))


STATIC_PLANTS = {
    "getattr": 'import torch\ndef f(out, x, d):\n    return getattr(torch, "autograd").grad(out, x, d)\n',
    "alias": "import torch\ndef f(out, x, d):\n    g = torch.autograd\n    return g.grad(out, x, d)\n",
    "parameter": "import torch\ndef f(x):\n    return torch.nn.Parameter(x)\n",
    "aten kernel": 'import torch\ndef f(d, y):\n    return getattr(getattr(torch, "ops").aten, '
                   '"sigmoid_backward")(d, y)\n',
    "backward string": 'def f(loss):\n    getattr(loss, "backward")()\n',
    "ops": "import torch\ndef f(d, y):\n    return torch.ops.aten.tanh_backward(d, y)\n",
    "F backward": "import torch.nn.functional as F\nimport torch\n"
                  "def f(g, x):\n    return torch._log_softmax_backward_data(g, x, 1, x.dtype)\n",
    "requires_grad": "def f(x):\n    x.requires_grad = True\n",
    ".grad": "def f(x):\n    return x.grad\n",
}


@pytest.mark.parametrize("plant", list(STATIC_PLANTS))
def test_the_static_scan_catches_each_plant(plant, tmp_path):
    copy = tmp_path / "manual"
    shutil.copytree(MANUAL, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert scan_folder(copy) == []
    (copy / "sub").mkdir()
    (copy / "sub" / "planted.py").write_text(STATIC_PLANTS[plant])
    found = scan_folder(copy)
    print(f"{plant}: {found}")
    assert found and all(f.startswith("sub/planted.py:") for f in found)


def test_the_static_scan_reads_non_python_files_and_spares_docstrings(tmp_path):
    (tmp_path / "blob.so").write_bytes(b"\x00\x01at::autograd::grad\x00")
    (tmp_path / "ok.py").write_text('"""Mirrors autograd\'s sigmoid_backward."""\n'
                                    "def sigmoid_backward(dout, y):\n"
                                    '    """no loss.backward() here"""  # nor x.grad\n'
                                    "    return dout * (1 - y) * y\n")
    assert scan_folder(tmp_path) == ["blob.so: bytes b'autograd'"]
