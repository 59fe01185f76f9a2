"""The readable MLP's training step, made fast without changing a bit of its results.

``FastMLP(mlp).train_step(x, target)`` runs the same ops as ``MLP.train_step`` — the same kernels
on the same operands in the same order, so the same roundings — but:

* arguments are validated once per input signature (shape, dtype, device), not on every op;
* every intermediate lives in a buffer allocated once and written with ``out=`` or in place;
  buffers are shared across layers where lifetimes allow (peak memory at most the twin's);
* activations are applied in place on the pre-activation (sigmoid, tanh, ReLU and identity need
  only their output y in the backward), the loss's difference is formed in the output buffer;
* the input gradient of the first layer, which a training step never uses, is not computed;
* ``dloss`` = 1 (the seed autograd starts from) is not multiplied in: x·1 = x exactly;
* on the CPU, SGD's per-tensor ``add_`` calls go through one ``torch._foreach_add_``, whose CPU
  implementation is a loop of the same ``add_`` (CUDA's fused foreach kernel is different
  arithmetic, so there it stays per tensor).

L2 regularization (``reg`` > 0) runs manual.losses.l2_forward / l2_backward, as the readable
step does, and adds the weight terms into the gradient buffers (x + y in place, the same bits).

Anything it does not specialise falls back to the readable code: an activation other than
sigmoid/tanh/relu/identity or a loss other than sum_squared/mse runs ``MLP.forward/backward``; an
optimizer that is not exactly manual.optim.SGD runs its own ``step``.  tests/test_fast.py checks
bit identity with the readable path and the autograd twin, over every activation, loss,
optimizer setting, reg and bias on/off.

The parameters are the MLP's own tensors, updated in place.  What the buffers depend on (the
parameter tensors' identity, the activations, the loss, reg) is part of the signature checked on
every step, so replacing a tensor in ``mlp.params`` or changing the loss rebuilds the plan rather
than updating stale tensors; ``reset()`` drops it explicitly.  Shapes: x (N, D), target (N, C);
letters as in manual/__init__.py.
"""
import torch

from manual import _check
from manual.layers import _column_major
from manual.losses import l2_backward, l2_forward, target_kind
from manual.optim import SGD

FAST_ACTIVATIONS = ("sigmoid", "tanh", "relu", "identity")
FAST_LOSSES = ("sum_squared", "mse")
_SGD_FIELDS = {"lr", "momentum", "dampening", "weight_decay", "nesterov", "buffers"}


class FastMLP:
    """A fast training step for a manual.MLP (see the module docstring)."""

    def __init__(self, mlp):
        if mlp.optimizer is None:
            raise ValueError("mlp: expected an MLP built with an optimizer (it has none)")
        self.mlp = mlp
        self.reset()

    @property
    def specialised(self):
        """True when the step runs the specialised schedule (else the readable fallback)."""
        return (all(a in FAST_ACTIVATIONS for a in self.mlp.activations)
                and self.mlp.loss in FAST_LOSSES)

    def reset(self):
        """Forget the buffers and the plan; the next step validates and builds them again."""
        self._signature = None
        self._plan = None

    # -- validation, once per signature: the checks of MLP.forward ---------------------------
    def _validate(self, x, target):
        self.mlp.check_input(x)
        _check.tensor("target", target, floating=False)
        if target.device != x.device:
            raise ValueError(f"target: expected device {x.device}, got {target.device}")
        out_shape = (x.shape[0], self.mlp.params[f"layers.{self.mlp.n_layers - 1}.weight"].shape[0])
        if target_kind(self.mlp.loss) == "values":
            _check.tensor("target", target)
            if tuple(target.shape) != out_shape:
                raise ValueError(f"target: expected shape {list(out_shape)} (that of the "
                                 f"predictions), got {list(target.shape)}")
            if target.dtype != x.dtype:
                raise TypeError(f"target: expected dtype {x.dtype}, got {target.dtype}")

    def _build(self, x):
        """Buffers and a fixed schedule of ops for a batch of N rows.

        H[i] (N, width_i): layer i's pre-activation, then (in place) its activation, then (in
        place) d pre-activation.  A and B (N·max width, flat): scratch shared by all layers for
        d activation and the activation backward's temporary; the loss's diff² and ReLU's mask are
        views of them.  Gradients: one buffer per parameter.  Which scratch buffer each op uses is
        decided here once, so the step itself only calls kernels.
        """
        mlp, n = self.mlp, x.shape[0]
        p = mlp.params
        opts = dict(dtype=x.dtype, device=x.device)
        weights = [p[f"layers.{i}.weight"] for i in range(mlp.n_layers)]
        widest = max(w.shape[0] for w in weights)
        scratch = (torch.empty(n * widest, **opts), torch.empty(n * widest, **opts))
        grads = {name: torch.empty_like(t) for name, t in p.items()}

        def view(buf, like, dtype=None):
            flat = buf if dtype is None else buf.view(torch.uint8).view(dtype)
            return flat[:like.numel()].view(like.shape)

        hs = [torch.empty((n, w.shape[0]), **opts) for w in weights]
        forward = []   # (weight transposed, bias or None, H, activation name or None)
        for i, w in enumerate(weights):
            act = mlp.activations[i] if i < mlp.n_layers - 1 else None
            forward.append((w.t(), p.get(f"layers.{i}.bias"), hs[i], act))
        out = hs[-1]
        backward = []  # per layer, last to first: see _forward_backward
        dz, dz_in = out, None   # the tensor holding d pre-activation, and the scratch it lives in
        for i in range(mlp.n_layers - 1, -1, -1):
            w = weights[i]
            # linear_backward's stride branches, decided once (layouts are fixed for the plan)
            gw = grads[f"layers.{i}.weight"]
            gw_op = (dz.t(), None, gw) if _column_major(w.t()) else (None, dz, gw.t())
            entry = {"gw": gw_op, "gb": grads.get(f"layers.{i}.bias"), "dz": dz}
            if i > 0:
                y = hs[i - 1]
                free = scratch[1] if dz_in is scratch[0] else scratch[0]
                other = scratch[0] if free is scratch[1] else scratch[1]
                dy = view(free, y)
                entry["dx"] = ((w.t(), dz.t(), dy.t()) if _column_major(y) else (dz, w, dy))
                act = mlp.activations[i - 1]
                entry.update(act=act, y=y, dy=dy, tmp=view(other, y),
                             mask=view(other, y, torch.bool) if act == "relu" else None)
                if act in ("sigmoid", "tanh"):
                    dz, dz_in = y, None
                else:           # relu and identity leave d pre-activation in dy's scratch
                    dz, dz_in = dy, free
            backward.append(entry)
        self._plan = {"one": torch.ones((), **opts), "forward": forward, "backward": backward,
                      "weights": weights, "grad_weights": [grads[f"layers.{i}.weight"]
                                                           for i in range(mlp.n_layers)],
                      "out": out, "sq": view(scratch[1], out), "grads": grads,
                      "scratch": scratch,
                      "params": list(p.values()), "grad_list": [grads[name] for name in p]}

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
        self._update(self._plan["params"], self._plan["grad_list"])
        return loss

    def _readable_step(self, x, target):
        loss, cache = self.mlp.forward(x, target)
        grads, _ = self.mlp.backward(cache)
        names = list(self.mlp.params)
        self._update(list(self.mlp.params.values()), [grads[name] for name in names], copy=True)
        return loss

    def _forward_backward(self, x, target):
        plan = self._plan
        # forward: z = x·Wᵀ + b (one addmm, as linear_forward), the activation in place on z
        a = x
        for wt, b, h, act in plan["forward"]:
            if b is not None:
                torch.addmm(b, a, wt, out=h)
            else:
                torch.mm(a, wt, out=h)
            if act == "sigmoid":
                h.sigmoid_()
            elif act == "tanh":
                h.tanh_()
            elif act == "relu":
                h.relu_()
            a = h
        # loss (manual.losses): diff = y_pred − target, formed in the output buffer
        out, sq = plan["out"], plan["sq"]
        torch.sub(out, target, out=out)
        torch.mul(out, out, out=sq)
        if self.mlp.loss == "mse":
            loss = sq.mean()
            out.mul_(2.0 / out.numel())  # ((2/numel)·diff)·dloss with dloss = 1
        else:
            loss = sq.sum()
            out.mul_(2.0)                # (2·diff)·dloss with dloss = 1
        reg = self.mlp.reg
        if reg:  # R = reg·Σ W², as MLP.forward: loss + l2_forward(weights, reg)
            loss = loss + l2_forward(plan["weights"], reg)
        # backward, layer by layer (manual.layers.linear_backward, manual.activations)
        forward = plan["forward"]
        for i, e in zip(range(len(forward) - 1, -1, -1), plan["backward"]):
            dz_t, dz, gw = e["gw"]
            x_i = forward[i - 1][2] if i > 0 else x
            if dz_t is not None:
                torch.mm(dz_t, x_i, out=gw)          # dW = doutᵀ·x
            else:
                torch.mm(x_i.t(), dz, out=gw)        # (xᵀ·dout)ᵀ for a transposed weight
            if e["gb"] is not None:
                torch.sum(e["dz"], 0, out=e["gb"])   # db = Σₙ dout
            if i == 0:
                break
            m1, m2, dy_out = e["dx"]
            torch.mm(m1, m2, out=dy_out)             # d activation = dout·W
            act, y, dy, tmp = e["act"], e["y"], e["dy"], e["tmp"]
            if act == "sigmoid":
                # dx = dy·(1 − y)·y: (1 − y), ·dy, ·y into y's buffer (a·b = b·a exactly)
                torch.sub(plan["one"], y, out=tmp)   # 1 − y, one correctly rounded subtraction
                tmp.mul_(dy)
                torch.mul(tmp, y, out=y)
            elif act == "tanh":
                # dx = dy·(1 − y²), (1 − y²) one fused addcmul, as activations.tanh_backward
                tmp.fill_(1)
                tmp.addcmul_(y, y, value=-1)
                torch.mul(dy, tmp, out=y)
            elif act == "relu":
                # dx = where(y <= 0, +0, dy): a fill (a select, not dy·mask), so +0 not −0
                torch.le(y, 0, out=e["mask"])
                dy.masked_fill_(e["mask"], 0.0)
            # identity: dx = dy, already in place
        if reg:  # dW += reg·2W (l2_backward with dloss = 1): the second use of each W
            for gw, dweight_reg in zip(plan["grad_weights"],
                                       l2_backward(plan["one"], plan["weights"], reg)):
                gw.add_(dweight_reg)
        return loss

    def _update(self, params, grads, copy=False):
        """manual.optim.SGD.step on the grad buffers, or the optimizer's own step.

        copy: the grads belong to the caller (readable fallback), so weight decay and Nesterov
        may not write into them.
        """
        opt = self.mlp.optimizer
        if type(opt) is not SGD or set(vars(opt)) != _SGD_FIELDS:
            names = list(self.mlp.params)
            opt.step(self.mlp.params, dict(zip(names, grads)))
            return
        on_cpu = params[0].device.type == "cpu"
        if copy and (opt.weight_decay != 0 or opt.nesterov):
            grads = [g.clone() for g in grads]
        if opt.weight_decay != 0:
            for g, p in zip(grads, params):
                g.add_(p, alpha=opt.weight_decay)            # g.add(p, alpha=wd)
        if opt.momentum != 0:
            names = list(self.mlp.params)
            bufs = []
            for name, g in zip(names, grads):
                buf = opt.buffers.get(name)
                if buf is None:
                    buf = opt.buffers[name] = g.clone()
                else:
                    buf.mul_(opt.momentum).add_(g, alpha=1 - opt.dampening)
                bufs.append(buf)
            if opt.nesterov:
                for g, buf in zip(grads, bufs):
                    g.add_(buf, alpha=opt.momentum)
            else:
                grads = bufs
        if on_cpu:
            torch._foreach_add_(params, grads, alpha=-opt.lr)  # a loop of p.add_(g, alpha=-lr)
        else:
            for p, g in zip(params, grads):
                p.add_(g, alpha=-opt.lr)

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
    if not fast.specialised:
        raise ValueError("fast: graph capture needs a specialised FastMLP (sigmoid/tanh/relu/"
                         "identity activations, sum_squared/mse loss)")
    opt = fast.mlp.optimizer
    if type(opt) is not SGD or set(vars(opt)) != _SGD_FIELDS:
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
