"""Argument checks for the manual ops, kept out of the math: each op makes one call here.

Every error is one line that names the argument and says what was expected (TypeError for a wrong
type or dtype, ValueError for a wrong shape, device or value).  Shapes as in manual/__init__.py.
"""
import math

import torch


# -- building blocks ---------------------------------------------------------------------------
def tensor(name, t, ndim=None, floating=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {list(t.shape)}")
    return t


def same(name_a, a, name_b, b):
    """a and b must share dtype and device."""
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b}: expected dtype {a.dtype} to match {name_a}, got {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_b}: expected device {a.device} to match {name_a}, got {b.device}")


def number(name, value, low=0.0, allow_equal=True, high=None):
    """A finite real number (not a bool) with low ≤ value (or <), and value < high when given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or math.isinf(value) or value < low or (value == low and not allow_equal) \
            or (high is not None and value >= high):
        rel = ">=" if allow_equal else ">"
        upper = f" and < {high}" if high is not None else ""
        raise ValueError(f"{name}: expected a finite number {rel} {low}{upper}, got {value!r}")
    return float(value)


# -- one call per op ---------------------------------------------------------------------------
def linear_args(x, weight, bias):
    """x (N, D), weight (H, D), bias (H,) or None: floating, one dtype and device."""
    tensor("x", x, ndim=2)
    tensor("weight", weight, ndim=2)
    same("x", x, "weight", weight)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x: expected shape [N, {weight.shape[1]}] to match weight "
                         f"{list(weight.shape)}, got {list(x.shape)}")
    if bias is not None:
        tensor("bias", bias, ndim=1)
        same("weight", weight, "bias", bias)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape [{weight.shape[0]}], got {list(bias.shape)}")


def linear_dout(dout, x, weight):
    """dout must be (N, H) for x (N, D) and weight (H, D)."""
    if dout.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(f"dout: expected shape {[x.shape[0], weight.shape[0]]}, "
                         f"got {list(dout.shape)}")


def loss_target(kind, y_pred, target):
    """target for a loss of kind "values" ((N, C), y_pred's dtype) or "labels" ((N,) int64).

    Labels are range-checked too (see ``labels``), which reads two numbers from the device.
    """
    tensor("target", target, floating=False)
    if target.device != y_pred.device:
        raise ValueError(f"target: expected device {y_pred.device}, got {target.device}")
    if kind == "values":
        tensor("target", target)
        if target.shape != y_pred.shape:
            raise ValueError(f"target: expected shape {list(y_pred.shape)} (that of the "
                             f"predictions), got {list(target.shape)}")
        if target.dtype != y_pred.dtype:
            raise TypeError(f"target: expected dtype {y_pred.dtype}, got {target.dtype}")
        return
    if target.dtype != torch.int64:
        raise TypeError(f"target: expected int64 class labels, got dtype {target.dtype}")
    if target.shape != (y_pred.shape[0],):
        raise ValueError(f"target: expected shape [{y_pred.shape[0]}] (one label per row), "
                         f"got {list(target.shape)}")
    labels(target, y_pred.shape[1])


class _Validated:
    """The last labels tensor found in range (held, so its identity cannot be reused), its
    in-place version counter and the class count it was checked against.

    Reading min and max of the labels is a device sync on CUDA, so a training loop that passes the
    same labels tensor every step (unchanged: same version) reads it once, not every step.
    """
    labels, version, classes = None, None, None
    tokens, tokens_version, vocab = None, None, None   # the same for token indices (tokens())


def _version(t):
    try:
        return t._version           # bumped by every in-place write to t or a view of it
    except RuntimeError:            # inference tensors keep no version: check them every time
        return None


def labels(target, n_classes):
    """target (N,) int64 labels must lie in [0, n_classes − 1].  A tensor already found in range
    (the same object, not written in place since) is not read again."""
    version = _version(target)
    if version is not None and _Validated.labels is target and _Validated.version == version \
            and _Validated.classes == n_classes:
        return
    if target.numel():
        low, high = torch.stack(torch.aminmax(target)).tolist()   # one read from the device
        if low < 0 or high >= n_classes:
            raise ValueError(f"target: expected labels in [0, {n_classes - 1}], got "
                             f"[{low}, {high}]")
    if version is not None:
        _Validated.labels, _Validated.version, _Validated.classes = target, version, n_classes


def tokens(idx, vocab):
    """token_indices(idx, vocab), except that a tensor already found in range (the same object,
    not written in place since) is not read again (as ``labels``).  Returns True when it read
    idx, False when it trusted the earlier check."""
    version = _version(idx)
    if version is not None and _Validated.tokens is idx and _Validated.tokens_version == version \
            and _Validated.vocab == vocab:
        return False
    token_indices(idx, vocab)
    if version is not None:
        _Validated.tokens, _Validated.tokens_version, _Validated.vocab = idx, version, vocab
    return True


def trust_labels(subset, n_classes):
    """Record `subset` as in range without reading it: a mini-batch cut from labels that
    `labels` has already checked (the caller vouches for it; nothing is read from the device)."""
    version = _version(subset)
    if version is not None:
        _Validated.labels, _Validated.version, _Validated.classes = subset, version, n_classes


def sgd_settings(lr, momentum, dampening, nesterov, weight_decay):
    """manual.optim.SGD's settings, as torch.optim.SGD accepts them."""
    lr, momentum, dampening, weight_decay = (
        number(f"optimizer.{name}", value) for name, value in
        (("lr", lr), ("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay)))
    if not isinstance(nesterov, bool):
        raise TypeError(f"optimizer.nesterov: expected true or false, got {nesterov!r}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("optimizer.nesterov: requires momentum > 0 and dampening = 0")
    return lr, momentum, dampening, nesterov, weight_decay


def adam_settings(lr, betas, eps, weight_decay, amsgrad):
    """manual.optim.Adam's settings, as torch.optim.Adam accepts them."""
    lr = number("optimizer.lr", lr)
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ValueError(f"optimizer.betas: expected two numbers in [0, 1), got {betas!r}")
    betas = tuple(number(f"optimizer.betas[{i}]", b, high=1.0) for i, b in enumerate(betas))
    eps = number("optimizer.eps", eps, allow_equal=False)
    weight_decay = number("optimizer.weight_decay", weight_decay)
    if not isinstance(amsgrad, bool):
        raise TypeError(f"optimizer.amsgrad: expected true or false, got {amsgrad!r}")
    return lr, betas, eps, weight_decay, amsgrad


def mlp_params(params, norm=None, embedding=None, block_names=()):
    """params: {"layers.{i}.weight": (H, D), "layers.{i}.bias": (H,)}, one dtype and device,
    every weight present; with a norm also "norms.{i}.weight" / "norms.{i}.bias" (H,), with an
    embedding also "embed.weight" (V, E); block_names: the residual blocks' parameter names
    (manual.blocks.block_param_names; their shapes: check_block_params).  Returns the number of
    layers."""
    if not isinstance(params, dict) or not params:
        raise TypeError("params: expected a non-empty dict of tensors named layers.{i}.weight")

    def optional(name):
        if name == "embed.weight":
            return embedding is not None
        if name in block_names:
            return True
        parts = name.split(".") if isinstance(name, str) else []
        return (norm is not None and len(parts) == 3 and parts[0] == "norms"
                and parts[1].isdigit() and parts[2] in ("weight", "bias"))
    extra = sorted(str(name) for name in params if _layer_index(name) is None and not optional(name))
    if extra:
        raise ValueError(f"params: unexpected names {extra}; expected layers.{{i}}.weight / "
                         f"layers.{{i}}.bias")
    indices = [_layer_index(name) for name in params if _layer_index(name) is not None]
    n_layers = 1 + max(indices, default=0)
    for i in range(n_layers):
        if f"layers.{i}.weight" not in params:
            raise ValueError(f"params: missing 'layers.{i}.weight'")
    first = params["layers.0.weight"]
    for name, t in params.items():
        one_d = name.endswith(("bias", ".norm.weight")) or name.startswith("norms.")
        tensor(f"params[{name!r}]", t, ndim=1 if one_d else 2)
        same("params['layers.0.weight']", first, f"params[{name!r}]", t)
    return n_layers


def _layer_index(name):
    """i for a name 'layers.{i}.weight' or 'layers.{i}.bias', else None."""
    parts = name.split(".") if isinstance(name, str) else []
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in ("weight", "bias"):
        return int(parts[1])
    return None


def mlp_widths(params, n_layers, activations, k):
    """Each layer at least 1×1, its bias as wide as its weight, and each layer's input width equal
    to the previous layer's output width (÷ k after a Maxout)."""
    for i in range(n_layers):
        w = params[f"layers.{i}.weight"]
        b = params.get(f"layers.{i}.bias")
        if 0 in w.shape:
            raise ValueError(f"params['layers.{i}.weight']: expected a layer at least 1 wide "
                             f"and 1 deep, got shape {list(w.shape)}")
        if b is not None and b.shape[0] != w.shape[0]:
            raise ValueError(f"params['layers.{i}.bias']: expected shape [{w.shape[0]}], "
                             f"got {list(b.shape)}")
        if i + 1 == n_layers:
            break
        width = w.shape[0]
        if activations[i] == "maxout":
            if width % k:
                raise ValueError(f"params['layers.{i}.weight']: maxout needs a width "
                                 f"divisible by k={k}, got {width}")
            width //= k
        nxt = params[f"layers.{i + 1}.weight"].shape[1]
        if nxt != width:
            raise ValueError(f"params['layers.{i + 1}.weight']: expected {width} input "
                             f"features (layer {i} output), got {nxt}")


def mlp_input(x, w0):
    """x must be a non-empty (N, D) floating tensor with the first weight's dtype and device."""
    tensor("x", x, ndim=2)
    same("params['layers.0.weight']", w0, "x", x)
    if x.shape[0] == 0:
        raise ValueError("x: expected a non-empty batch, got 0 rows")
    if x.shape[1] != w0.shape[1]:
        raise ValueError(f"x: expected shape [N, {w0.shape[1]}], got {list(x.shape)}")


# -- the optional layers (manual/norm.py, dropout.py, embedding.py) ---------------------------
NORMS = ("batchnorm", "layernorm")


def check_norm(norm):
    """None or one of NORMS."""
    if norm is not None and norm not in NORMS:
        raise ValueError(f"norm: unknown name {norm!r}; expected null, {', '.join(NORMS)}")
    return norm


def check_dropout(p, name="dropout"):
    """A dropout probability: a number with 0 <= p < 1."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"{name}: expected a probability p with 0 <= p < 1, got {p!r}")
    return float(p)


def check_embedding(embedding):
    """None or {"vocab": V, "dim": E, "context": T}, each an integer >= 1; returns a copy."""
    if embedding is None:
        return None
    keys = ("vocab", "dim", "context")
    if not isinstance(embedding, dict) or set(embedding) != set(keys) or not all(
            isinstance(embedding[k], int) and not isinstance(embedding[k], bool) and embedding[k] >= 1
            for k in keys):
        raise ValueError(f"embedding: expected null or {{\"vocab\": V, \"dim\": E, \"context\": T}} "
                         f"with integers >= 1, got {embedding!r}")
    return dict(embedding)


def token_indices(idx, vocab, name="x"):
    """idx: an integer tensor of token indices in [0, vocab) (reads min and max from the device)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of token indices, got {type(idx).__name__}")
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"{name}: embedding expects integer token indices, got dtype {idx.dtype}")
    if idx.numel():
        low, high = torch.stack(torch.aminmax(idx)).tolist()
        if low < 0 or high >= vocab:
            raise ValueError(f"{name}: token indices must lie in [0, {vocab}), got values in "
                             f"[{low}, {high}]")
    return idx


def norm_args(x, weight, bias, name):
    """x (N, D); weight, bias (D,) or None, x's dtype and device."""
    tensor("x", x, ndim=2)
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            tensor(f"{name}.{arg}", t, ndim=1)
            same("x", x, f"{name}.{arg}", t)
            if t.shape[0] != x.shape[1]:
                raise ValueError(f"{name}.{arg}: expected shape [{x.shape[1]}] to match x's "
                                 f"features, got {list(t.shape)}")


def mlp_norm_settings(momentum, eps):
    """Batch/layer norm's momentum in [0, 1] and eps in (0, 1]."""
    momentum = number("momentum", momentum, high=None)
    if momentum > 1:
        raise ValueError(f"momentum: expected a number in [0, 1], got {momentum!r}")
    eps = number("eps", eps, allow_equal=False)
    if eps > 1:
        raise ValueError(f"eps: expected a number in (0, 1], got {eps!r}")
    return momentum, eps


def mlp_optional_layers(params, n_layers, norm, embedding):
    """Every hidden layer's norms.{i}.weight/bias present (H,) with a norm; embed.weight (V, E)
    with an embedding, and the first layer taking context·dim inputs."""
    if norm is not None:
        for i in range(n_layers - 1):
            width = params[f"layers.{i}.weight"].shape[0]
            for kind in ("weight", "bias"):
                name = f"norms.{i}.{kind}"
                if name not in params:
                    raise ValueError(f"params: missing {name!r} (norm {norm!r})")
                if params[name].shape[0] != width:
                    raise ValueError(f"params[{name!r}]: expected shape [{width}], "
                                     f"got {list(params[name].shape)}")
    if embedding is not None:
        if "embed.weight" not in params:
            raise ValueError("params: missing 'embed.weight' (embedding)")
        shape = list(params["embed.weight"].shape)
        if shape != [embedding["vocab"], embedding["dim"]]:
            raise ValueError(f"params['embed.weight']: expected shape [{embedding['vocab']}, "
                             f"{embedding['dim']}], got {shape}")
        inputs = params["layers.0.weight"].shape[1]
        if inputs != embedding["context"] * embedding["dim"]:
            raise ValueError(f"embedding: context·dim = {embedding['context'] * embedding['dim']} "
                             f"must equal the first layer's inputs, got {inputs}")


def mlp_tokens(x, embedding):
    """x: (N, T) integer token indices, N >= 1, T the embedding's context, values in [0, V)."""
    token_indices(x, embedding["vocab"])
    if x.dim() != 2 or x.shape[1] != embedding["context"] or x.shape[0] == 0:
        raise ValueError(f"x: expected token indices of shape [N, {embedding['context']}] "
                         f"(embedding context), got {list(x.shape)}")
