"""A multilayer perceptron stacked from the manual ops, with a hand-written backward pass.

Layer i is ``linear (layers.i.weight, layers.i.bias) -> activation i``; the last layer has no
activation and feeds the loss.  Parameter names equal the autograd twin's ``state_dict`` keys, so
gradients compare by name.  A Maxout hidden layer of width H has a linear layer of H·K outputs.

Shapes: x (N, D); sizes = [D, H1, …, C]; output (N, C); target (N, C) values or (N,) labels.
"""
import math

import torch

from manual import _check
from manual.activations import activation_backward, activation_forward, activation_list
from manual.layers import linear_backward, linear_forward
from manual.losses import l2_backward, l2_forward, loss_backward, loss_forward, target_kind

INIT_SCHEMES = ("uniform", "randn")


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


def _record(trace, name, t):
    """Keep t under name when the caller asked for a trace (a dict), else nothing."""
    if trace is not None:
        trace[name] = t


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
        self.n_layers = _check.mlp_params(params)
        self.activations = activation_list(activation, self.n_layers - 1)
        _check.mlp_widths(params, self.n_layers, self.activations, k)
        target_kind(loss)  # validates the name
        self.params, self.loss, self.optimizer = params, loss, optimizer
        self.options = {"slope": slope, "alpha": alpha, "k": k}
        self.reg = _check.number("reg", reg, low=0)

    def _weights(self):
        return [self.params[f"layers.{i}.weight"] for i in range(self.n_layers)]

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
        _check.mlp_input(x, self.params["layers.0.weight"])

    def predict(self, x, trace=None):
        """Forward through the layers only.  x (N, D) -> output (N, C), per-layer caches.

        trace: a dict to record each pre-activation and activation in, or None.
        """
        self.check_input(x)
        caches = []
        h = x
        for i in range(self.n_layers):
            z, lin_cache = linear_forward(h, self.params[f"layers.{i}.weight"],
                                          self.params.get(f"layers.{i}.bias"))
            _record(trace, f"layers.{i}.pre_activation", z)
            h, act_cache = z, None
            if i < self.n_layers - 1:
                act = self.activations[i]
                h, act_cache = activation_forward(act, z, **self._act_options(act))
                _record(trace, f"layers.{i}.activation", h)
            caches.append((lin_cache, act_cache))
        return h, caches

    def forward(self, x, target, trace=None):
        """x (N, D), target (N, C) values or (N,) labels -> scalar loss, cache for backward."""
        out, caches = self.predict(x, trace)
        loss, loss_cache = loss_forward(self.loss, out, target)
        if self.reg:
            loss = loss + l2_forward(self._weights(), self.reg)
        _record(trace, "output", out)
        _record(trace, "loss", loss)
        return loss, (caches, loss_cache)

    def backward(self, cache, dloss=None, trace=None):
        """cache from forward -> grads (name -> tensor shaped like the parameter), dx (N, D).

        The forward in reverse: dloss → d output → per layer (d activation → d pre-activation →
        dW, db, d input).  dloss defaults to 1, the seed autograd starts from.
        """
        caches, loss_cache = cache
        if dloss is None:
            w0 = self.params["layers.0.weight"]
            dloss = torch.ones((), dtype=w0.dtype, device=w0.device)
        dh = loss_backward(self.loss, dloss, loss_cache)
        _record(trace, "grad_output", dh)
        grads = {}
        for i in reversed(range(self.n_layers)):
            lin_cache, act_cache = caches[i]
            if i < self.n_layers - 1:
                _record(trace, f"layers.{i}.grad_activation", dh)
                dh = activation_backward(self.activations[i], dh, act_cache)
            _record(trace, f"layers.{i}.grad_pre_activation", dh)
            dh, dweight, dbias = linear_backward(dh, lin_cache)
            grads[f"layers.{i}.weight"] = dweight
            if dbias is not None:
                grads[f"layers.{i}.bias"] = dbias
        if self.reg:  # the second use of each W: its gradient is added to the data gradient
            for i, dweight_reg in enumerate(l2_backward(dloss, self._weights(), self.reg)):
                grads[f"layers.{i}.weight"] = grads[f"layers.{i}.weight"] + dweight_reg
        ordered = {name: grads[name] for name in self.params}
        return ordered, dh

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
        grads, _ = self.backward(cache)
        self.step(grads)
        return loss
