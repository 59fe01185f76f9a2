"""The readable MLP's training step, made fast without changing a bit of its results.

``FastMLP(mlp).train_step(x, target)`` runs the same ops as ``MLP.train_step`` — the same kernels
on the same operands in the same order, so the same roundings — but:

* arguments are validated once per input signature (shape, dtype, device), not on every op
  (class labels, whose values can change at the same signature, are range-checked every step);
* every intermediate lives in a buffer allocated once and written with ``out=`` or in place;
  buffers are shared across layers where lifetimes allow (peak memory at most the twin's);
* sigmoid, tanh, ReLU and identity are applied in place on the pre-activation (their backward
  needs only the output y); leaky ReLU, ELU and maxout, whose backward needs the pre-activation
  or the arg-max, run the readable activation pair on the pre-activation buffer (their output
  and gradient are new tensors each step);
* the losses: sum_squared and mse form the difference in the output buffer; cross_entropy runs
  manual.losses' ops into buffers (the nll cascade's plan made once per batch size; the row sums
  of d log-probabilities, which are −1/N exactly, kept) and writes d output into the output
  buffer; svm runs the readable forward/backward (O(1) ops) and copies d output there;
* the input gradient of the first layer, which a training step never uses, is not computed;
* ``dloss`` = 1 (the seed autograd starts from) is not multiplied in where it would be the
  last op (x·1 = x exactly);
* the optimizers SGD (momentum, dampening, Nesterov, weight decay), Adam and AdamW (amsgrad
  too) update the gradient buffers in place; on the CPU each of their per-tensor ops goes
  through one ``torch._foreach_*`` call, whose CPU implementation is a loop of the same per-tensor
  op (CUDA's fused foreach kernels are different arithmetic, so there they stay per tensor).

L2 regularization (``reg`` > 0) runs manual.losses.l2_forward / l2_backward, as the readable
step does, and adds the weight terms into the gradient buffers (x + y in place, the same bits).

What it does not specialise falls back to the readable code, visibly (``specialised`` is False,
``fallback`` says why): an activation or loss it does not know, or a norm, dropout or embedding layer, runs the
readable step; an
optimizer that is not exactly manual.optim.SGD/Adam/AdamW (a subclass, extra state) runs its own
``step``.  tests/test_fast.py checks bit identity with the readable path and the autograd twin
for every loss × optimizer pair, every activation, reg and bias on/off.

The parameters are the MLP's own tensors, updated in place.  What the buffers depend on (the
parameter tensors' identity, the activations, the loss, reg) is part of the signature checked on
every step, so replacing a tensor in ``mlp.params`` or changing the loss rebuilds the plan rather
than updating stale tensors; ``reset()`` drops it explicitly.  Shapes: x (N, D), target (N, C)
values or (N,) labels; letters as in manual/__init__.py.

One module (about 580 lines) because it is one thing: a single plan whose buffers, loss and
optimizer stages share lifetimes; split, each part would need the others' buffer layout.
"""
import torch

from manual import _check
from manual.activations import activation_backward, activation_forward
from manual.layers import _column_major
from manual.losses import (NllCascade, l2_backward, l2_forward, log_softmax_backward_exp,
                           loss_backward, loss_forward, target_kind)
from manual.optim import SGD, Adam, AdamW

IN_PLACE_ACTIVATIONS = ("sigmoid", "tanh", "relu", "identity")
FAST_ACTIVATIONS = IN_PLACE_ACTIVATIONS + ("leaky_relu", "elu", "maxout")
FAST_LOSSES = ("sum_squared", "mse", "cross_entropy", "svm")
_SGD_FIELDS = {"lr", "momentum", "dampening", "weight_decay", "nesterov", "buffers"}
_ADAM_FIELDS = {"lr", "betas", "eps", "weight_decay", "amsgrad", "steps", "exp_avg", "exp_avg_sq",
                "max_exp_avg_sq"}


def _optimizer_kind(opt):
    """'sgd' or 'adam' when the fast update mirrors opt exactly, else None (opt.step runs)."""
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


def relu_backward_over(dy, y_bits):
    """dx = where(y <= 0, +0, dy) in place in dy, as activations.relu_backward (a select, not
    dy·mask: +0 not −0, no inf·0), for y = ReLU's output given as its bits (an integer view),
    which this overwrites.  Integer ops on the bits are vectorized and allocate nothing (where,
    masked_fill_ and a comparison into integers do neither).  ReLU's output is ±0, positive or
    NaN, so y <= 0 exactly where its bits without the sign are 0; the mask is all ones where dy
    passes and 0 where +0 goes.  Returns dy."""
    magnitude = torch.iinfo(y_bits.dtype).max                 # every bit but the sign
    mask = torch.bitwise_and(y_bits, magnitude, out=y_bits).clamp_max_(1).neg_()
    dy.view(mask.dtype).bitwise_and_(mask)
    return dy


class FastMLP:
    """A fast training step for a manual.MLP (see the module docstring)."""

    def __init__(self, mlp):
        if mlp.optimizer is None:
            raise ValueError("mlp: expected an MLP built with an optimizer (it has none)")
        self.mlp = mlp
        self.reset()

    @property
    def fallback(self):
        """Why the step runs the readable code (None when it runs the specialised schedule)."""
        mlp = self.mlp
        if any(a not in FAST_ACTIVATIONS for a in mlp.activations):
            return f"activations {mlp.activations}: not all in {FAST_ACTIVATIONS}"
        if mlp.loss not in FAST_LOSSES:
            return f"loss {mlp.loss!r} not in {FAST_LOSSES}"
        if mlp.norm is not None or mlp.dropout or mlp.embedding is not None:
            return "norm, dropout and embedding layers are not specialised"
        return None

    @property
    def specialised(self):
        """True when the step runs the specialised schedule (else the readable fallback)."""
        return self.fallback is None

    def reset(self):
        """Forget the buffers and the plan; the next step validates and builds them again."""
        self._signature = None
        self._plan = None
        self._ce = None

    # -- validation, once per signature: the checks of MLP.forward ---------------------------
    def _validate(self, x, target):
        self.mlp.check_input(x)
        w = self.mlp.params[f"layers.{self.mlp.n_layers - 1}.weight"]
        predictions = w.new_empty(()).expand(x.shape[0], w.shape[0])   # (N, C), no storage
        _check.loss_target(target_kind(self.mlp.loss), predictions, target)

    def _build(self, x):
        """Buffers and a fixed schedule of ops for a batch of N rows.

        H[i] (N, width_i): layer i's pre-activation; for an in-place activation then its
        activation, then (sigmoid, tanh: in place) d pre-activation; ReLU's backward mask is
        written over its output y once y is no longer needed.  Scratch buffers A and B (flat,
        each as large as the largest view placed in it, B only where some layer needs it):
        d activation, alternating between A and B where d pre-activation stays in the scratch
        buffer (ReLU, identity), and the temporary of sigmoid/tanh's backward; the regression
        losses' diff² is a view of A.  Gradients: one buffer per parameter.  Which buffer each op
        uses is decided here once, so the step itself only calls kernels.  A layer with a
        readable activation (leaky_relu, elu, maxout) gets its output and its d pre-activation as
        new tensors from the readable pair.
        """
        mlp, n = self.mlp, x.shape[0]
        p = mlp.params
        opts = dict(dtype=x.dtype, device=x.device)
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        weights = [p[f"layers.{i}.weight"] for i in range(mlp.n_layers)]
        grads = {name: torch.empty_like(t) for name, t in p.items()}

        def out_width(i):   # width of layer i's activation output (maxout: H of its H·K)
            w = weights[i].shape[0]
            return w // mlp.options["k"] if mlp.activations[i] == "maxout" else w

        hs = [torch.empty((n, w.shape[0]), **opts) for w in weights]
        forward = []   # (weight transposed, bias or None, H, activation or None, its options)
        for i, w in enumerate(weights):
            act = mlp.activations[i] if i < mlp.n_layers - 1 else None
            forward.append((w.t(), p.get(f"layers.{i}.bias"), hs[i], act,
                            mlp._act_options(act) if act else {}))
        out = hs[-1]
        # which scratch buffer (0: A, 1: B) and shape each view takes; sizes follow
        views = []     # (entry, key, scratch index, shape)
        if mlp.loss in ("sum_squared", "mse"):
            views.append((None, "sq", 0, tuple(out.shape)))
        backward = []  # per layer, last to first: see _forward_backward
        dz_in = None   # the scratch buffer d pre-activation lives in (None: not a scratch one)
        for i in range(mlp.n_layers - 1, -1, -1):
            w = weights[i]
            gw = grads[f"layers.{i}.weight"]
            # linear_backward's dW branch (the layout of W is fixed for the plan)
            entry = {"w": w, "gw": gw if _column_major(w.t()) else None, "gw_t": gw.t(),
                     "gb": grads.get(f"layers.{i}.bias")}
            if i > 0:
                act = mlp.activations[i - 1]
                shape = (n, out_width(i - 1))
                free = 1 if dz_in == 0 else 0      # not where d pre-activation (the mm's input) is
                views.append((entry, "dy", free, shape))
                entry["act"] = act
                if act in ("sigmoid", "tanh"):
                    views.append((entry, "tmp", 1 - free, shape))
                if act == "relu":
                    entry["mask"] = hs[i - 1].view(bits)
                dz_in = free if act in ("relu", "identity") else None  # else in y, or new
            backward.append(entry)
        sizes = [max((sh[0] * sh[1] for _, _, k, sh in views if k == j), default=0) for j in (0, 1)]
        scratch = [torch.empty(size, **opts) if size else None for size in sizes]
        sq = None
        for entry, key, k, shape in views:
            view = scratch[k][:shape[0] * shape[1]].view(shape)
            if entry is None:
                sq = view
            else:
                entry[key] = view
        one = torch.ones((), **opts)
        if mlp.loss == "cross_entropy":
            cascade = NllCascade(n, x.device)
            g = (-(one / float(n))).expand(n, 1).contiguous()   # as cross_entropy_backward forms it
            self._ce = {"cascade": cascade, "logp": torch.empty_like(out),
                        "dlogp": torch.empty_like(out),
                        "picked": torch.empty((n, 1), **opts), "g": g,
                        "sums": torch.empty(cascade.size, **opts),
                        "kept": torch.empty(cascade.kept.shape[0], **opts),
                        "total": torch.empty(1, **opts)}
        self._plan = {"one": one, "forward": forward, "backward": backward, "weights": weights,
                      "grad_weights": [grads[f"layers.{i}.weight"] for i in range(mlp.n_layers)],
                      "out": out, "sq": sq, "grads": grads,
                      "scratch": scratch, "params": list(p.values()),
                      "grad_list": [grads[name] for name in p], "names": list(p)}

    # -- the step ---------------------------------------------------------------------------
    def train_step(self, x, target):
        """forward, backward, step; returns the loss (before the update), a fresh 0-d tensor."""
        mlp = self.mlp
        sig = (x.shape, x.dtype, x.device, target.shape, target.dtype, target.device, mlp.loss,
               mlp.reg, tuple(mlp.activations), tuple(map(id, mlp.params.values())))
        if sig != self._signature:
            self._validate(x, target)
            if self.specialised:
                self._build(x)
            self._signature = sig
        if not self.specialised:
            return self._readable_step(x, target)
        loss = self._forward_backward(x, target)
        plan = self._plan
        self._update(plan["names"], plan["params"], plan["grad_list"])
        return loss

    def _readable_step(self, x, target):
        loss, cache = self.mlp.forward(x, target)
        grads, _ = self.mlp.backward(cache)
        names = list(self.mlp.params)
        self._update(names, list(self.mlp.params.values()), [grads[name] for name in names],
                     copy=True)
        return loss

    def _forward_backward(self, x, target):
        plan = self._plan
        # forward: z = x·Wᵀ + b (one addmm, as linear_forward), the activation in place on z or
        # (readable activations) from z into a new tensor
        a, inputs, caches = x, [], []
        for wt, b, h, act, act_options in plan["forward"]:
            inputs.append(a)
            if b is not None:
                torch.addmm(b, a, wt, out=h)
            else:
                torch.mm(a, wt, out=h)
            cache = None
            if act == "sigmoid":
                h.sigmoid_()
            elif act == "tanh":
                h.tanh_()
            elif act == "relu":
                h.relu_()
            elif act is not None and act != "identity":
                h, cache = activation_forward(act, h, **act_options)
            caches.append(cache)
            a = h
        out = plan["out"]
        loss = self._loss(out, target)
        reg = self.mlp.reg
        if reg:  # R = reg·Σ W², as MLP.forward: loss + l2_forward(weights, reg)
            loss = loss + l2_forward(plan["weights"], reg)
        # backward, layer by layer (manual.layers.linear_backward, manual.activations)
        dz = out
        for i, e in zip(range(len(inputs) - 1, -1, -1), plan["backward"]):
            x_i = inputs[i]
            if e["gw"] is not None:
                torch.mm(dz.t(), x_i, out=e["gw"])      # dW = doutᵀ·x
            else:
                torch.mm(x_i.t(), dz, out=e["gw_t"])    # (xᵀ·dout)ᵀ for a transposed weight
            if e["gb"] is not None:
                torch.sum(dz, 0, out=e["gb"])           # db = Σₙ dout
            if i == 0:
                break
            y, dy = x_i, e["dy"]                        # layer i's input: layer i−1's activation
            if _column_major(y):                        # d activation = dout·W, autograd's branch
                torch.mm(e["w"].t(), dz.t(), out=dy.t())
            else:
                torch.mm(dz, e["w"], out=dy)
            act, tmp = e["act"], e.get("tmp")
            if act == "sigmoid":
                # dx = dy·(1 − y)·y: (1 − y), ·dy, ·y into y's buffer (a·b = b·a exactly)
                torch.sub(plan["one"], y, out=tmp)      # 1 − y, one correctly rounded subtraction
                tmp.mul_(dy)
                dz = torch.mul(tmp, y, out=y)
            elif act == "tanh":
                # dx = dy·(1 − y²), (1 − y²) one fused addcmul, as activations.tanh_backward
                tmp.fill_(1)
                tmp.addcmul_(y, y, value=-1)
                dz = torch.mul(dy, tmp, out=y)
            elif act == "relu":
                dz = relu_backward_over(dy, e["mask"])     # over y, which is done with
            elif act == "identity":
                dz = dy                                 # dx = dy, already in place
            else:                                       # the readable backward of the pair
                dz = activation_backward(act, dy, caches[i - 1])
        if reg:  # dW += reg·2W (l2_backward with dloss = 1): the second use of each W
            for gw, dweight_reg in zip(plan["grad_weights"],
                                       l2_backward(plan["one"], plan["weights"], reg)):
                gw.add_(dweight_reg)
        return loss

    def _loss(self, out, target):
        """The loss of the output buffer out; leaves d loss / d out in out."""
        name = self.mlp.loss
        if name in ("sum_squared", "mse"):
            # manual.losses: diff = y_pred − target, formed in the output buffer
            sq = self._plan["sq"]
            torch.sub(out, target, out=out)
            torch.mul(out, out, out=sq)
            if name == "mse":
                loss = sq.mean()
                out.mul_(2.0 / out.numel())  # ((2/numel)·diff)·dloss with dloss = 1
            else:
                loss = sq.sum()
                out.mul_(2.0)                # (2·diff)·dloss with dloss = 1
            return loss
        if name == "cross_entropy":
            return self._cross_entropy(out, target)
        # svm: the readable pair (its cache does not hold out, so out is free)
        loss, cache = loss_forward(name, out, target)
        out.copy_(loss_backward(name, self._plan["one"], cache))
        return loss

    def _cross_entropy(self, out, labels):
        """manual.losses.cross_entropy_forward and _backward (dloss = 1), op for op, into the
        buffers; d output is written into out."""
        ce = self._ce
        _check.labels(labels, out.shape[1])
        logp = torch.log_softmax(out, 1, out=ce["logp"])
        column = labels.unsqueeze(1)
        picked = torch.gather(logp, 1, column, out=ce["picked"]).view(-1)
        if out.device.type == "cpu":
            loss = ce["cascade"].mean(picked, ce["sums"], ce["kept"], ce["total"])
        else:  # as cross_entropy_forward off the CPU
            loss = -(picked.sum()) / float(out.shape[0])
        # dlogp = −(1/N) at [i, labelᵢ], 0 elsewhere; its row sums are that one value, exactly
        dlogp = ce["dlogp"].zero_().scatter_(1, column, ce["g"])
        torch.addcmul(dlogp, log_softmax_backward_exp(logp), ce["g"], value=-1, out=out)
        return loss

    # -- the update -------------------------------------------------------------------------
    def _update(self, names, params, grads, copy=False):
        """The optimizer's step on the grad tensors: a mirror of manual.optim's SGD / Adam /
        AdamW step with in-place ops (grads are overwritten), or the optimizer's own step.

        copy: the grads belong to the caller (readable fallback), so they are copied before an
        update would write into them.
        """
        opt = self.mlp.optimizer
        kind = _optimizer_kind(opt)
        if kind is None:
            opt.step(self.mlp.params, dict(zip(names, grads)))
        elif kind == "sgd":
            self._sgd(opt, names, params, grads, copy)
        else:
            self._adam(opt, names, params, grads, copy)

    @staticmethod
    def _sgd(opt, names, params, grads, copy):
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
            else:   # the first step: b = g
                bufs = []
                for name, g in zip(names, grads):
                    buf = opt.buffers.get(name)
                    if buf is None:
                        buf = opt.buffers[name] = g.clone()
                    else:
                        buf.mul_(opt.momentum).add_(g, alpha=1 - opt.dampening)
                    bufs.append(buf)
            if opt.nesterov:
                _each(ADD_, grads, bufs, alpha=opt.momentum)  # g + μ·b
            else:
                grads = bufs
        _each(ADD_, params, grads, alpha=-opt.lr)  # p − lr·g

    @staticmethod
    def _adam(opt, names, params, grads, copy):
        """manual.optim.Adam.step (AdamW: decoupled weight decay; amsgrad), op for op."""
        beta1, beta2 = opt.betas
        lr, wd, eps = opt.lr, opt.weight_decay, opt.eps
        for name, p in zip(names, params):
            if name not in opt.steps:  # lazy state, as Adam._init_group
                opt.steps[name] = 0
                opt.exp_avg[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                opt.exp_avg_sq[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if opt.amsgrad:
                    opt.max_exp_avg_sq[name] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)
            opt.steps[name] += 1
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

    def held_tensors(self):
        """Every tensor this step keeps from one call to the next: the parameters, the optimizer's
        state and the fast path's buffers (what peak-memory accounting counts as held)."""
        tensors = list(self.mlp.params.values())
        for value in vars(self.mlp.optimizer).values():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif isinstance(value, dict):
                tensors += [t for t in value.values() if isinstance(t, torch.Tensor)]
        plan = self._plan or {}
        tensors += list(plan.get("grads", {}).values()) + [plan.get("one")]
        tensors += list(plan.get("scratch", ()))
        if plan and self.mlp.loss == "cross_entropy":
            tensors += [t for t in self._ce.values() if isinstance(t, torch.Tensor)]
        tensors += [entry[2] for entry in plan.get("forward", [])]
        return [t for t in tensors if t is not None]

    @property
    def grads(self):
        """The gradients of the last specialised step, by parameter name (None before one)."""
        return None if self._plan is None else dict(self._plan["grads"])


def _graph_state(fast):
    """What a captured graph bakes in: the tensors it reads and writes (by identity) and the
    settings it was recorded with.  A change to any of them makes the graph stale."""
    mlp, opt = fast.mlp, fast.mlp.optimizer
    return (tuple((name, id(t)) for name, t in mlp.params.items()),
            tuple((name, id(t)) for name, t in getattr(opt, "buffers", {}).items()),
            id(opt), tuple(sorted((k, v) for k, v in vars(opt).items() if k != "buffers")),
            mlp.loss, mlp.reg, tuple(mlp.activations))


def check_graphable(fast):
    """Raise a one-line ValueError unless CudaGraphStep can capture this FastMLP's step.

    Only the specialised step with exactly manual.optim.SGD is captured: its update reads only
    tensors and hyper-parameters fixed at capture.  Adam/AdamW keep the step count and the bias
    corrections as Python numbers that a graph would freeze at their capture-time values (every
    replay would reuse step t), so they are refused rather than replayed wrong."""
    if not isinstance(fast, FastMLP):
        raise TypeError(f"fast: expected a manual.fast.FastMLP, got {type(fast).__name__}")
    mlp = fast.mlp
    if not fast.specialised or mlp.loss not in ("sum_squared", "mse") \
            or any(a not in IN_PLACE_ACTIVATIONS for a in mlp.activations):
        raise ValueError("fast: graph capture needs a specialised FastMLP with sigmoid/tanh/relu/"
                         "identity activations and a sum_squared/mse loss (the label losses read "
                         "the labels on the host)")
    opt = fast.mlp.optimizer
    if _optimizer_kind(opt) != "sgd":
        raise ValueError(f"optimizer: graph capture supports manual.optim.SGD only, got "
                         f"{type(opt).__name__} (its step count would be frozen in the graph)")


class CudaGraphStep:
    """A FastMLP training step captured once as a CUDA graph and replayed.

    x, target: example tensors fixing the shapes (copied into static buffers on every call).
    Only SGD (with or without momentum, Nesterov, weight decay) is captured; anything else is
    refused at construction (check_graphable).  The optimizer's hyper-parameters are baked in at
    capture.  With momentum the first step runs uncaptured (it creates the momentum buffers), so
    the captured graph has one control flow.  The warm-up the capture needs runs on a side stream
    and its effect on the parameters and the momentum buffers is undone before capture.

    After capture, every step checks that the parameters, the momentum buffers, the optimizer and
    its settings are the ones captured (optimizer.load_state_dict, a swapped parameter tensor or a
    new lr make the graph stale) and refuses to replay a stale graph; ``reset()`` drops the graph
    so the next step captures again.
    """

    def __init__(self, fast, x, target, warmup=3):
        check_graphable(fast)
        if x.device.type != "cuda":
            raise ValueError(f"x: expected a CUDA tensor for graph capture, got device {x.device}")
        self.fast = fast
        self.static_x = x.detach().clone()
        self.static_target = target.detach().clone()
        self.warmup = warmup
        self.reset()

    def reset(self):
        """Drop the captured graph (and the FastMLP's plan); the next step captures again."""
        self.graph = None
        self.static_loss = None
        self._state = None
        self.fast.reset()

    def _needs_eager_first_step(self):
        opt = self.fast.mlp.optimizer
        return opt.momentum != 0 and not opt.buffers

    def _capture(self):
        fast, params = self.fast, self.fast.mlp.params
        opt = fast.mlp.optimizer
        saved = {name: t.clone() for name, t in params.items()}
        saved_bufs = {name: t.clone() for name, t in opt.buffers.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fast.train_step(self.static_x, self.static_target)
        torch.cuda.current_stream().wait_stream(side)
        for name, t in params.items():
            t.copy_(saved[name])
        for name, t in opt.buffers.items():
            t.copy_(saved_bufs[name])
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = fast.train_step(self.static_x, self.static_target)
        self._state = _graph_state(fast)

    def train_step(self, x, target):
        """Same contract as FastMLP.train_step; the loss is a fresh copy of the static one."""
        if self.graph is None:
            check_graphable(self.fast)
            if self._needs_eager_first_step():
                return self.fast.train_step(x, target)
            self._capture()
        elif _graph_state(self.fast) != self._state:
            raise ValueError("CudaGraphStep: the parameters, optimizer state or settings changed "
                             "since capture (load_state_dict, a replaced tensor, a new lr); call "
                             "reset() to capture again")
        if x.shape != self.static_x.shape or target.shape != self.static_target.shape:
            raise ValueError(f"x: expected the captured shapes {list(self.static_x.shape)} and "
                             f"{list(self.static_target.shape)}, got {list(x.shape)} and "
                             f"{list(target.shape)}")
        self.static_x.copy_(x)
        self.static_target.copy_(target)
        self.graph.replay()
        return self.static_loss.clone()
