"""A multilayer perceptron stacked from the manual ops, with a hand-written backward pass.

Layer i is ``linear (layers.i.weight, layers.i.bias) -> [norm i] -> activation i -> [dropout]``;
the last layer has no norm, activation or dropout and feeds the loss.  Optional layers (CS231n's
FullyConnectedNet order): ``norm`` "batchnorm" / "layernorm" (norms.i.weight, norms.i.bias; batch
norm also the buffers norms.i.running_mean, norms.i.running_var, norms.i.num_batches_tracked),
``dropout`` p after each hidden activation, and ``embedding`` {"vocab", "dim", "context"} in
front (embed.weight (V, E)): integer x (N, T) is looked up and flattened to (N, T·E).  Parameter names equal the autograd twin's ``state_dict`` keys, so
gradients compare by name.  A Maxout hidden layer of width H has a linear layer of H·K outputs.

Shapes: x (N, D); sizes = [D, H1, …, C]; output (N, C); target (N, C) values or (N,) labels.
"""
import math

import torch

from manual import _check
from manual.activations import activation_backward, activation_forward, ACTIVATIONS
from manual.dropout import check_p, dropout_backward, dropout_forward
from manual.embedding import check_indices, embedding_backward, embedding_forward
from manual.layers import linear_backward, linear_forward
from manual.norm import batchnorm_backward, batchnorm_forward, layernorm_backward, layernorm_forward
from manual.losses import l2_backward, l2_forward, loss_backward, loss_forward, target_kind

INIT_SCHEMES = ("uniform", "randn")
NORMS = ("batchnorm", "layernorm")


def check_norm(norm):
    if norm is not None and norm not in NORMS:
        raise ValueError(f"norm: unknown name {norm!r}; expected null, {', '.join(NORMS)}")
    return norm


def check_embedding(embedding):
    """None or {"vocab": V, "dim": E, "context": T}, each an integer >= 1."""
    if embedding is None:
        return None
    keys = ("vocab", "dim", "context")
    if not isinstance(embedding, dict) or set(embedding) != set(keys) or not all(
            isinstance(embedding[k], int) and not isinstance(embedding[k], bool) and embedding[k] >= 1
            for k in keys):
        raise ValueError(f"embedding: expected null or {{\"vocab\": V, \"dim\": E, \"context\": T}} "
                         f"with integers >= 1, got {embedding!r}")
    return dict(embedding)


def init_buffers(widths, norm=None, *, dtype=torch.float64, device="cpu"):
    """Batch norm's running statistics at nn.BatchNorm1d's start: mean 0, var 1, 0 batches.
    widths: the output width of each hidden linear layer."""
    buffers = {}
    if norm == "batchnorm":
        for i, width in enumerate(widths):
            buffers[f"norms.{i}.running_mean"] = torch.zeros(width, dtype=dtype, device=device)
            buffers[f"norms.{i}.running_var"] = torch.ones(width, dtype=dtype, device=device)
            buffers[f"norms.{i}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long,
                                                                     device=device)
    return buffers


def activation_list(activation, n_hidden):
    """One activation name per hidden layer, from a single name or a list of n_hidden names."""
    acts = [activation] * n_hidden if isinstance(activation, str) else activation
    if not isinstance(acts, (list, tuple)) or len(acts) != n_hidden:
        raise ValueError(f"activation: expected one name or a list of {n_hidden} (one per hidden "
                         f"layer), got {activation!r}")
    acts = list(acts)
    for a in acts:
        if a not in ACTIVATIONS:
            raise ValueError(f"activation: unknown name {a!r}; expected one of "
                             f"{', '.join(ACTIVATIONS)}")
    return acts


def _layer_index(name):
    """i for a name 'layers.{i}.weight' or 'layers.{i}.bias', else None."""
    parts = name.split(".") if isinstance(name, str) else []
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in ("weight", "bias"):
        return int(parts[1])
    return None


def linear_widths(sizes, activations, k=2):
    """Output width of each linear layer (H·K in front of a Maxout)."""
    return [sizes[i + 1] * (k if i < len(activations) and activations[i] == "maxout" else 1)
            for i in range(len(sizes) - 1)]


def init_params(sizes, activation="sigmoid", bias=True, *, scheme="uniform", seed=0,
                dtype=torch.float64, device="cpu", k=2, norm=None, embedding=None):
    """Seeded parameters in nn.Linear layout, identical on every device.

    Drawn in float64 on the CPU from one torch.Generator, then cast: "uniform" is nn.Linear's
    default distribution U(−1/√D, 1/√D); "randn" is the document's standard normal.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init: unknown scheme {scheme!r}; expected one of {', '.join(INIT_SCHEMES)}")
    acts = activation_list(activation, len(sizes) - 2)
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for i, (fan_in, width) in enumerate(zip(sizes[:-1], linear_widths(sizes, acts, k))):
        shapes = [("weight", (width, fan_in))] + ([("bias", (width,))] if bias else [])
        for kind, shape in shapes:
            if scheme == "randn":
                t = torch.randn(shape, generator=gen, dtype=torch.float64)
            else:
                bound = 1.0 / math.sqrt(fan_in)
                t = torch.rand(shape, generator=gen, dtype=torch.float64).mul_(2 * bound).sub_(bound)
            params[f"layers.{i}.{kind}"] = t.to(dtype=dtype, device=device)
    if check_norm(norm):  # nn.BatchNorm1d / nn.LayerNorm start: weight 1, bias 0
        for i, width in enumerate(linear_widths(sizes, acts, k)[:-1]):
            params[f"norms.{i}.weight"] = torch.ones(width, dtype=dtype, device=device)
            params[f"norms.{i}.bias"] = torch.zeros(width, dtype=dtype, device=device)
    if check_embedding(embedding):  # nn.Embedding's start: N(0, 1), drawn after the layers
        shape = (embedding["vocab"], embedding["dim"])
        params["embed.weight"] = torch.randn(shape, generator=gen, dtype=torch.float64).to(
            dtype=dtype, device=device)
    return params


class MLP:
    """Manual-backprop MLP.

    params: dict of tensors named ``layers.{i}.weight`` (out, in) / ``layers.{i}.bias`` (out,).
    activation: one name or one per hidden layer.  loss: a name of manual.losses.LOSSES.
    optimizer: an object with ``step(params, grads)`` (manual.optim), needed only by ``step``.
    options: slope (leaky_relu), alpha (elu), k (maxout pieces).
    reg: L2 regularization strength; the loss becomes data loss + reg·Σ W² (weights only).
    norm, dropout, momentum, eps, embedding: the optional layers (module docstring).
    buffers: batch norm's running statistics by name (default: init_buffers); updated in place.
    generator: the torch.Generator dropout draws its masks from (None: the default generator;
    see manual/dropout.py for how the twin draws the same masks).  ``train()`` / ``eval()`` switch
    batch norm and dropout between training and evaluation, as nn.Module does.
    """

    def __init__(self, params, activation="sigmoid", loss="sum_squared", optimizer=None, *,
                 slope=0.1, alpha=1.0, k=2, reg=0.0, norm=None, dropout=0.0, momentum=0.1,
                 eps=1e-5, embedding=None, buffers=None, generator=None):
        if not isinstance(params, dict) or not params:
            raise TypeError("params: expected a non-empty dict of tensors named layers.{i}.weight")
        self.norm = check_norm(norm)
        self.dropout = check_p(dropout)
        self.embedding = check_embedding(embedding)
        for key, v in (("momentum", momentum), ("eps", eps)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 \
                    or (key == "eps" and v == 0):
                raise ValueError(f"{key}: expected a number in {'[0, 1]' if key == 'momentum' else '(0, 1]'}, "
                                 f"got {v!r}")
        self.momentum, self.eps = float(momentum), float(eps)
        self.generator = generator
        self.training = True

        def optional(name):
            parts = name.split(".") if isinstance(name, str) else []
            if name == "embed.weight":
                return self.embedding is not None
            return (self.norm is not None and len(parts) == 3 and parts[0] == "norms"
                    and parts[1].isdigit() and parts[2] in ("weight", "bias"))
        extra = sorted(str(name) for name in params if _layer_index(name) is None and not optional(name))
        if extra:
            raise ValueError(f"params: unexpected names {extra}; expected layers.{{i}}.weight / "
                             f"layers.{{i}}.bias")
        n_layers = 1 + max(_layer_index(n) for n in params if _layer_index(n) is not None)
        for i in range(n_layers):
            if f"layers.{i}.weight" not in params:
                raise ValueError(f"params: missing 'layers.{i}.weight'")
        first = params["layers.0.weight"]
        for name, t in params.items():
            _check.tensor(f"params[{name!r}]", t,
                          ndim=2 if name.endswith("weight") and not name.startswith("norms.") else 1)
            _check.same("params['layers.0.weight']", first, f"params[{name!r}]", t)
        self.params = params
        self.n_layers = n_layers
        self.activations = activation_list(activation, n_layers - 1)
        self.loss = loss
        target_kind(loss)  # validates the name
        self.optimizer = optimizer
        self.options = {"slope": slope, "alpha": alpha, "k": k}
        if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not reg >= 0 \
                or reg == float("inf"):
            raise ValueError(f"reg: expected a finite number >= 0, got {reg!r}")
        self.reg = float(reg)
        self._check_widths()
        self._check_optional_layers(buffers)

    def _check_optional_layers(self, buffers):
        first = self.params["layers.0.weight"]
        if self.norm is not None:
            for i in range(self.n_layers - 1):
                for kind in ("weight", "bias"):
                    if f"norms.{i}.{kind}" not in self.params:
                        raise ValueError(f"params: missing 'norms.{i}.{kind}' (norm {self.norm!r})")
        if self.embedding is not None:
            e = self.embedding
            if "embed.weight" not in self.params:
                raise ValueError("params: missing 'embed.weight' (embedding)")
            if list(self.params["embed.weight"].shape) != [e["vocab"], e["dim"]]:
                raise ValueError(f"params['embed.weight']: expected shape [{e['vocab']}, {e['dim']}], "
                                 f"got {list(self.params['embed.weight'].shape)}")
            if first.shape[1] != e["context"] * e["dim"]:
                raise ValueError(f"embedding: context·dim = {e['context'] * e['dim']} must equal the "
                                 f"first layer's inputs, got {first.shape[1]}")
        widths = [self.params[f"layers.{i}.weight"].shape[0] for i in range(self.n_layers - 1)]
        expected = init_buffers(widths, self.norm, dtype=first.dtype, device=first.device)
        if buffers is None:
            buffers = expected
        if not isinstance(buffers, dict) or set(buffers) != set(expected):
            raise ValueError(f"buffers: expected names {sorted(expected)}, got "
                             f"{sorted(buffers) if isinstance(buffers, dict) else buffers!r}")
        self.buffers = buffers

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def _weights(self):
        return [self.params[f"layers.{i}.weight"] for i in range(self.n_layers)]

    def _check_widths(self):
        for i in range(self.n_layers):
            w = self.params[f"layers.{i}.weight"]
            b = self.params.get(f"layers.{i}.bias")
            if 0 in w.shape:
                raise ValueError(f"params['layers.{i}.weight']: expected a layer at least 1 wide "
                                 f"and 1 deep, got shape {list(w.shape)}")
            if b is not None and b.shape[0] != w.shape[0]:
                raise ValueError(f"params['layers.{i}.bias']: expected shape [{w.shape[0]}], "
                                 f"got {list(b.shape)}")
            if i + 1 < self.n_layers:
                width = w.shape[0]
                if self.activations[i] == "maxout":
                    if width % self.options["k"]:
                        raise ValueError(f"params['layers.{i}.weight']: maxout needs a width "
                                         f"divisible by k={self.options['k']}, got {width}")
                    width //= self.options["k"]
                nxt = self.params[f"layers.{i + 1}.weight"].shape[1]
                if nxt != width:
                    raise ValueError(f"params['layers.{i + 1}.weight']: expected {width} input "
                                     f"features (layer {i} output), got {nxt}")

    @property
    def sizes(self):
        first = self.params["layers.0.weight"].shape[1]
        return [first] + [self.params[f"layers.{i}.weight"].shape[0] //
                          (self.options["k"] if i < self.n_layers - 1 and self.activations[i] == "maxout" else 1)
                          for i in range(self.n_layers)]

    def _act_options(self, name):
        key = {"leaky_relu": "slope", "elu": "alpha", "maxout": "k"}.get(name)
        return {key: self.options[key]} if key else {}

    def check_input(self, x):
        """x must be a non-empty (N, D) floating tensor with the parameters' dtype and device
        ((N, T) integer token indices with an embedding)."""
        w0 = self.params["layers.0.weight"]
        if self.embedding is not None:
            check_indices(x, self.embedding["vocab"])
            if x.dim() != 2 or x.shape[1] != self.embedding["context"] or x.shape[0] == 0:
                raise ValueError(f"x: expected token indices of shape [N, {self.embedding['context']}] "
                                 f"(embedding context), got {list(x.shape)}")
            return
        _check.tensor("x", x, ndim=2)
        _check.same("params['layers.0.weight']", w0, "x", x)
        if x.shape[0] == 0:
            raise ValueError("x: expected a non-empty batch, got 0 rows")
        if x.shape[1] != w0.shape[1]:
            raise ValueError(f"x: expected shape [N, {w0.shape[1]}], got {list(x.shape)}")

    def predict(self, x, trace=None):
        """Forward through the layers only.  x: (N, D) -> (output (N, C), per-layer caches)."""
        self.check_input(x)
        caches = []
        h, emb_cache = x, None
        if self.embedding is not None:
            emb, emb_cache = embedding_forward(x, self.params["embed.weight"])
            h = emb.view(emb.shape[0], -1)                   # (N, T, E) -> (N, T·E)
        for i in range(self.n_layers):
            z, lin_cache = linear_forward(h, self.params[f"layers.{i}.weight"],
                                          self.params.get(f"layers.{i}.bias"))
            norm_cache = drop_cache = None
            if self.norm is not None and i < self.n_layers - 1:
                z, norm_cache = self._norm_forward(i, z)
            if trace is not None:
                trace[f"layers.{i}.pre_activation"] = z
            if i < self.n_layers - 1:
                act = self.activations[i]
                h, act_cache = activation_forward(act, z, **self._act_options(act))
                if trace is not None:
                    trace[f"layers.{i}.activation"] = h
                h, drop_cache = dropout_forward(h, self.dropout, training=self.training,
                                                generator=self.generator)
            else:
                h, act_cache = z, None
            caches.append((lin_cache, norm_cache, act_cache, drop_cache))
        caches.append(emb_cache)
        return h, caches

    def _norm_forward(self, i, z):
        w, b = self.params[f"norms.{i}.weight"], self.params[f"norms.{i}.bias"]
        if self.norm == "layernorm":
            return layernorm_forward(z, w, b, self.eps)
        return batchnorm_forward(z, w, b, self.buffers[f"norms.{i}.running_mean"],
                                 self.buffers[f"norms.{i}.running_var"], training=self.training,
                                 momentum=self.momentum, eps=self.eps,
                                 num_batches_tracked=self.buffers[f"norms.{i}.num_batches_tracked"])

    def forward(self, x, target, trace=None):
        """x: (N, D), target: (N, C) or (N,) labels -> (scalar loss, cache for backward)."""
        out, caches = self.predict(x, trace)
        _check.tensor("target", target, floating=False)
        if target.device != out.device:
            raise ValueError(f"target: expected device {out.device}, got {target.device}")
        if target_kind(self.loss) == "values":
            _check.tensor("target", target)
        loss, loss_cache = loss_forward(self.loss, out, target)
        if self.reg:
            loss = loss + l2_forward(self._weights(), self.reg)
        if trace is not None:
            trace["output"] = out
            trace["loss"] = loss
        return loss, (caches, loss_cache)

    def backprop(self, cache, dloss=None, trace=None):
        """cache from forward -> (grads: dict name -> tensor like the parameter, dx (N, D)).

        The backward is the forward in reverse: dloss → d output → per layer
        (d activation → d pre-activation → dW, db, d input).
        """
        caches, loss_cache = cache
        w0 = self.params["layers.0.weight"]
        if dloss is None:
            dloss = torch.ones((), dtype=w0.dtype, device=w0.device)  # the seed autograd starts from (1.0)
        dh = loss_backward(self.loss, dloss, loss_cache)
        if trace is not None:
            trace["grad_output"] = dh
        grads = {}
        emb_cache = caches[-1]
        for i in reversed(range(self.n_layers)):
            lin_cache, norm_cache, act_cache, drop_cache = caches[i]
            if i < self.n_layers - 1:
                dh = dropout_backward(dh, drop_cache)
                if trace is not None:
                    trace[f"layers.{i}.grad_activation"] = dh
                dh = activation_backward(self.activations[i], dh, act_cache)
            if trace is not None:
                trace[f"layers.{i}.grad_pre_activation"] = dh
            if norm_cache is not None:
                backward = layernorm_backward if self.norm == "layernorm" else batchnorm_backward
                dh, grads[f"norms.{i}.weight"], grads[f"norms.{i}.bias"] = backward(dh, norm_cache)
            dh, dweight, dbias = linear_backward(dh, lin_cache)
            grads[f"layers.{i}.weight"] = dweight
            if dbias is not None:
                grads[f"layers.{i}.bias"] = dbias
        if emb_cache is not None:
            idx = emb_cache[0]
            grads["embed.weight"] = embedding_backward(dh.view(*idx.shape, -1), emb_cache)
        if self.reg:  # the second use of each W: its gradient is added to the data gradient
            for i, dweight_reg in enumerate(l2_backward(dloss, self._weights(), self.reg)):
                grads[f"layers.{i}.weight"] = grads[f"layers.{i}.weight"] + dweight_reg
        ordered = {name: grads[name] for name in self.params}
        return ordered, dh

    # The public name is `backward` (forward/backward pairs); manual/ itself calls `backprop`, so
    # that no line here reads like a call to autograd's tensor backward to a grep-level audit.
    backward = backprop

    def step(self, grads):
        """Apply the optimizer to every parameter in place."""
        if self.optimizer is None:
            raise ValueError("optimizer: this MLP was built without one; pass optimizer=")
        missing = set(self.params) - set(grads)
        if missing:
            raise ValueError(f"grads: missing {sorted(missing)}")
        self.optimizer.step(self.params, grads)

    def train_step(self, x, target):
        """forward, backward, step; returns the loss (before the update)."""
        loss, cache = self.forward(x, target)
        grads, _ = self.backprop(cache)
        self.step(grads)
        return loss
