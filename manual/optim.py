"""Optimizers that update parameter tensors in place, mirroring torch.optim's single-tensor path.

The twin runs torch.optim.SGD / Adam / AdamW with foreach=False, i.e. `_single_tensor_sgd` and
`_single_tensor_adam` (torch 2.13) on every device; on CPU that is also PyTorch's default.  Each
update below is those functions' arithmetic, op for op; settings are named as PyTorch names them.

An optimizer is built once for a dict of parameters and called as ``opt.step(params, grads)``
with two dicts keyed by the same names.  State (momentum buffers) is kept per name and exposed by
``state_dict()`` / ``load_state_dict()``.

Arithmetic notes: ``p.add_(g, alpha=-lr)`` is one fused multiply-add in the add kernel
(vec::fmadd), which ``p - lr*g`` (two roundings) is not; the same holds for ``alpha=`` in weight
decay and momentum.
"""
import torch

from manual import _check


class SGD:
    """SGD with momentum, dampening, Nesterov and weight decay, as torch.optim.SGD.

    g ← g + wd·p;  b ← g (first step) or μ·b + (1 − τ)·g;  g ← g + μ·b (Nesterov) or b;  p ← p − lr·g
    """

    name = "sgd"
    SETTINGS = ("lr", "momentum", "dampening", "nesterov", "weight_decay")

    def __init__(self, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        self.lr, self.momentum, self.dampening, self.nesterov, self.weight_decay = \
            _check.sgd_settings(lr, momentum, dampening, nesterov, weight_decay)
        self.buffers = {}

    def step(self, params, grads):
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay != 0:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self.momentum_buffer(name, g)
                g = g.add(buf, alpha=self.momentum) if self.nesterov else buf
            p.add_(g, alpha=-self.lr)

    def momentum_buffer(self, name, g):
        """The momentum buffer of parameter ``name`` updated with gradient g, and returned:
        b ← g (a copy) on its first step, else μ·b + (1 − τ)·g in place."""
        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = g.clone()
        else:
            buf.mul_(self.momentum).add_(g, alpha=1 - self.dampening)
        return buf

    def state_dict(self):
        return {"buffers": {k: v.clone() for k, v in self.buffers.items()}}

    def load_state_dict(self, state):
        self.buffers = {k: v.clone() for k, v in state["buffers"].items()}


class Adam:
    """Adam (and, with decoupled_weight_decay, AdamW), as torch.optim.Adam / AdamW.

    t ← t + 1;  g ← g + wd·p (Adam)  or  p ← p·(1 − lr·wd) (AdamW)
    m ← lerp(m, g, 1 − β₁);  v ← β₂·v + (1 − β₂)·g²;  v̂max ← max(v̂max, v) (amsgrad)
    p ← p − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + eps)

    Arithmetic of _single_tensor_adam (non-capturable): the bias corrections are Python floats
    (C doubles): step_size = lr / (1 − β₁ᵗ), bias_correction2_sqrt = (1 − β₂ᵗ) ** 0.5; the
    denominator is ``(v.sqrt() / bc2_sqrt).add_(eps)`` and the step one ``addcdiv_`` with
    value −step_size.  ``lerp_`` and ``addcmul_`` are single kernels with their own rounding
    (lerp_ uses two formulas split at weight 0.5), so they are called, not re-expressed.
    """

    name = "adam"
    SETTINGS = ("lr", "betas", "eps", "weight_decay", "amsgrad")
    decoupled_weight_decay = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False):
        self.lr, self.betas, self.eps, self.weight_decay, self.amsgrad = \
            _check.adam_settings(lr, betas, eps, weight_decay, amsgrad)
        self.steps, self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq = {}, {}, {}, {}

    def step(self, params, grads):
        beta1, beta2 = self.betas
        lr, wd, eps = self.lr, self.weight_decay, self.eps
        for name, p in params.items():
            g = grads[name]
            self.count_step(name, p)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            if wd != 0:
                if self.decoupled_weight_decay:
                    p.mul_(1 - lr * wd)
                else:
                    g = g.add(p, alpha=wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            t = float(self.steps[name])        # PyTorch keeps step as a tensor and reads .item()
            bias_correction1 = 1 - beta1 ** t
            bias_correction2 = 1 - beta2 ** t
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2 ** 0.5
            if self.amsgrad:
                vmax = self.max_exp_avg_sq[name]
                torch.maximum(vmax, v, out=vmax)
                denom = (vmax.sqrt() / bias_correction2_sqrt).add_(eps)
            else:
                denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(m, denom, value=-step_size)

    def count_step(self, name, p):
        """Count a step of parameter ``name`` (tensor p); on its first, create its state as
        Adam._init_group does (lazily): step 0, moments (and amsgrad's max) zeros like p."""
        if name not in self.steps:
            self.steps[name] = 0
            self.exp_avg[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.exp_avg_sq[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.amsgrad:
                self.max_exp_avg_sq[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.steps[name] += 1

    def state_dict(self):
        return {"steps": dict(self.steps),
                "exp_avg": {k: v.clone() for k, v in self.exp_avg.items()},
                "exp_avg_sq": {k: v.clone() for k, v in self.exp_avg_sq.items()},
                "max_exp_avg_sq": {k: v.clone() for k, v in self.max_exp_avg_sq.items()}}

    def load_state_dict(self, state):
        self.steps = {k: int(v) for k, v in state["steps"].items()}
        self.exp_avg = {k: v.clone() for k, v in state["exp_avg"].items()}
        self.exp_avg_sq = {k: v.clone() for k, v in state["exp_avg_sq"].items()}
        self.max_exp_avg_sq = {k: v.clone() for k, v in state.get("max_exp_avg_sq", {}).items()}


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay p ← p·(1 − lr·wd) before the moments (default wd 0.01)."""

    name = "adamw"
    decoupled_weight_decay = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(lr, betas, eps, weight_decay, amsgrad)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(name, **settings):
    """An optimizer by name with PyTorch's setting names; an unknown setting is a ValueError."""
    try:
        cls = OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"optimizer.name: unknown name {name!r}; expected one of "
                         f"{', '.join(OPTIMIZERS)}") from None
    for key in settings:
        if key not in cls.SETTINGS:
            raise ValueError(f"optimizer.{key}: not a setting of {name!r}; expected among "
                             f"{', '.join(cls.SETTINGS)}")
    return cls(**settings)
