"""FastMLP's optimizer update: manual.optim's SGD / Adam / AdamW step, op for op, with in-place ops
on lists of tensors.

``update(opt, names, params, grads)`` overwrites the gradient tensors (copy=True: they belong to
the caller and are copied first where a step would write into them).  On the CPU each per-tensor
op goes through one ``torch._foreach_*`` call, whose CPU implementation is a loop of the same
per-tensor op, so the same bits; CUDA's fused foreach kernels are different arithmetic, so there
the ops stay per tensor.  The per-parameter state is created by the optimizer itself
(``SGD.momentum_buffer``, ``Adam.count_step``).  An optimizer that is not exactly one of
manual.optim's (a subclass, extra state) runs its own ``step``.
"""
import torch

from manual.optim import SGD, Adam, AdamW

_SGD_FIELDS = {"lr", "momentum", "dampening", "weight_decay", "nesterov", "buffers"}
_ADAM_FIELDS = {"lr", "betas", "eps", "weight_decay", "amsgrad", "steps", "exp_avg", "exp_avg_sq",
                "max_exp_avg_sq"}


def optimizer_kind(opt):
    """'sgd' or 'adam' when the update below mirrors opt exactly, else None (opt.step runs)."""
    if type(opt) is SGD and set(vars(opt)) == _SGD_FIELDS:
        return "sgd"
    if type(opt) in (Adam, AdamW) and set(vars(opt)) == _ADAM_FIELDS:
        return "adam"
    return None


# (torch._foreach_* op, the torch.Tensor method it loops over on the CPU)
ADD_ = (torch._foreach_add_, torch.Tensor.add_)
MUL_ = (torch._foreach_mul_, torch.Tensor.mul_)
DIV_ = (torch._foreach_div_, torch.Tensor.div_)
LERP_ = (torch._foreach_lerp_, torch.Tensor.lerp_)
ADDCMUL_ = (torch._foreach_addcmul_, torch.Tensor.addcmul_)
ADDCDIV_ = (torch._foreach_addcdiv_, torch.Tensor.addcdiv_)
SQRT = (torch._foreach_sqrt, torch.Tensor.sqrt)


def _each(op, first, *others, **kwargs):
    """The tensor method of op (a pair above) on every tensor of the list ``first``; each of
    ``others`` is a list (its matching item is passed) or a number (passed to all).  On the CPU
    one call of op's torch._foreach_* function, whose CPU implementation is this loop of the
    per-tensor method, so the same bits; elsewhere the loop itself."""
    foreach, method = op
    if first and first[0].device.type == "cpu":
        return foreach(first, *others, **kwargs)
    return [method(t, *[o[i] if isinstance(o, list) else o for o in others], **kwargs)
            for i, t in enumerate(first)]


def update(opt, names, params, grads, copy=False):
    """opt's step on the parameters (lists in the order of names); grads are overwritten unless
    copy.  opt.step itself runs for an optimizer optimizer_kind does not know."""
    kind = optimizer_kind(opt)
    if kind is None:
        opt.step(dict(zip(names, params)), dict(zip(names, grads)))
    elif kind == "sgd":
        sgd_update(opt, names, params, grads, copy)
    else:
        adam_update(opt, names, params, grads, copy)


def sgd_update(opt, names, params, grads, copy):
    """manual.optim.SGD.step, op for op."""
    if copy and (opt.weight_decay != 0 or opt.nesterov):
        grads = [g.clone() for g in grads]
    if opt.weight_decay != 0:
        _each(ADD_, grads, params, alpha=opt.weight_decay)  # g.add(p, alpha=wd)
    if opt.momentum != 0:
        if all(name in opt.buffers for name in names):
            bufs = [opt.buffers[name] for name in names]
            _each(MUL_, bufs, opt.momentum)  # b·μ
            _each(ADD_, bufs, grads, alpha=1 - opt.dampening)  # + (1 − τ)·g
        else:   # a first step: b = g where there is no buffer yet, as SGD.step
            bufs = [opt.momentum_buffer(name, g) for name, g in zip(names, grads)]
        if opt.nesterov:
            _each(ADD_, grads, bufs, alpha=opt.momentum)  # g + μ·b
        else:
            grads = bufs
    _each(ADD_, params, grads, alpha=-opt.lr)  # p − lr·g


def adam_update(opt, names, params, grads, copy):
    """manual.optim.Adam.step (AdamW: decoupled weight decay; amsgrad), op for op."""
    beta1, beta2 = opt.betas
    lr, wd, eps = opt.lr, opt.weight_decay, opt.eps
    for name, p in zip(names, params):
        opt.count_step(name, p)   # the lazy state on a first step, then t ← t + 1
    if wd != 0:
        if opt.decoupled_weight_decay:
            _each(MUL_, params, 1 - lr * wd)  # p·(1 − lr·wd)
        else:
            if copy:
                grads = [g.clone() for g in grads]
            _each(ADD_, grads, params, alpha=wd)  # g + wd·p
    ms = [opt.exp_avg[name] for name in names]
    vs = [opt.exp_avg_sq[name] for name in names]
    _each(LERP_, ms, grads, 1 - beta1)  # m ← lerp(m, g, 1 − β₁)
    _each(MUL_, vs, beta2)  # v ← β₂·v
    _each(ADDCMUL_, vs, grads, grads, value=1 - beta2)  # + (1 − β₂)·g²
    if opt.amsgrad:
        vmaxs = [opt.max_exp_avg_sq[name] for name in names]
        for vmax, v in zip(vmaxs, vs):
            torch.maximum(vmax, v, out=vmax)
        vs = vmaxs
    # the bias corrections are Python floats (C doubles), per parameter's step count
    groups = {}
    for i, name in enumerate(names):
        groups.setdefault(opt.steps[name], []).append(i)
    for t, idx in groups.items():
        step_size = lr / (1 - beta1 ** float(t))
        bias_correction2_sqrt = (1 - beta2 ** float(t)) ** 0.5
        denom = _each(SQRT, [vs[i] for i in idx])
        _each(DIV_, denom, bias_correction2_sqrt)  # √v / √(1 − β₂ᵗ)
        _each(ADD_, denom, eps)  # + eps
        _each(ADDCDIV_, [params[i] for i in idx], [ms[i] for i in idx], denom,
              value=-step_size)  # p − step·m / denom
