"""Optimizers that update parameter tensors in place, mirroring torch.optim's single-tensor path.

An optimizer is built once for a dict of parameters and called as ``opt.step(params, grads)``
with two dicts keyed by the same names.  State (momentum buffers) is kept per name and exposed by
``state_dict()`` / ``load_state_dict()``.

Arithmetic notes: ``p.add_(g, alpha=-lr)`` is one fused multiply-add in the add kernel
(vec::fmadd), which ``p - lr*g`` (two roundings) is not; the same holds for ``alpha=`` in weight
decay and momentum.
"""
import math

import torch


def _check_hyper(name, value, low=0.0, allow_equal=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or math.isinf(value) or value < low or (value == low and not allow_equal):
        rel = ">=" if allow_equal else ">"
        raise ValueError(f"{name}: expected a finite number {rel} {low}, got {value!r}")
    return float(value)


class SGD:
    """SGD with momentum, dampening, Nesterov and weight decay, as torch.optim.SGD.

    g ← g + wd·p;  b ← g (first step) or μ·b + (1 − τ)·g;  g ← g + μ·b (Nesterov) or b;  p ← p − lr·g
    """

    name = "sgd"

    def __init__(self, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        self.lr = _check_hyper("lr", lr)
        self.momentum = _check_hyper("momentum", momentum)
        self.dampening = _check_hyper("dampening", dampening)
        self.weight_decay = _check_hyper("weight_decay", weight_decay)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov: expected true or false, got {nesterov!r}")
        if nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov: requires momentum > 0 and dampening = 0")
        self.nesterov = nesterov
        self.buffers = {}

    def step(self, params, grads):
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay != 0:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self.buffers.get(name)
                if buf is None:
                    buf = self.buffers[name] = g.clone()
                else:
                    buf.mul_(self.momentum).add_(g, alpha=1 - self.dampening)
                g = g.add(buf, alpha=self.momentum) if self.nesterov else buf
            p.add_(g, alpha=-self.lr)

    def state_dict(self):
        return {"buffers": {k: v.clone() for k, v in self.buffers.items()}}

    def load_state_dict(self, state):
        self.buffers = {k: v.clone() for k, v in state["buffers"].items()}


OPTIMIZERS = {"sgd": SGD}


def make_optimizer(name, **settings):
    try:
        cls = OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"optimizer.name: unknown name {name!r}; expected one of "
                         f"{', '.join(OPTIMIZERS)}") from None
    try:
        return cls(**settings)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            bad = str(exc).split("'")[1] if "'" in str(exc) else "?"
            raise ValueError(f"optimizer.{bad}: not a setting of {name!r}") from None
        raise
