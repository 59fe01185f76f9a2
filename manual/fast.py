"""The readable MLP's training step, made fast without changing a bit of its results.

``FastMLP(mlp).train_step(x, target)`` runs the same ops as ``MLP.train_step`` — the same kernels
on the same operands in the same order, so the same roundings — but:

* arguments are validated once per input signature (shape, dtype, device), not on every op
  (class labels, whose values can change at the same signature, are range-checked every step);
* every intermediate lives in a buffer allocated once and written with ``out=`` or in place;
  buffers are shared across layers where lifetimes allow (peak memory at most the twin's);
* activations dispatch through manual.activations' ACTIVATIONS table (manual/fast_activations.py):
  sigmoid, tanh, ReLU and identity are applied in place on the pre-activation (their backward
  needs only the output y); leaky ReLU, ELU and maxout, whose backward needs the pre-activation
  or the arg-max, run the readable activation pair on the pre-activation buffer (their output
  and gradient are new tensors each step);
* the losses: sum_squared and mse form the difference in the output buffer; cross_entropy runs
  manual.losses' ops into buffers (the nll cascade's plan bound to its buffers once per batch
  size; the row sums of d log-probabilities, which are −1/N exactly, kept; the log-softmax
  backward's float32 Sleef exp through kernel_order.LogSoftmaxBackwardExp, 17 ops into kept
  buffers) and forms d log-probabilities and then d output in the output buffer itself (the
  logits are not read after log_softmax); svm runs the readable forward/backward (O(1) ops) and
  copies d output there;
* views of the plan's buffers that ops take (a transpose for a GEMM, ReLU's integer view, the
  labels' column) are made once and kept while the tensor is the same one;
* the input gradient of the first layer, which a training step never uses, is not computed;
* ``dloss`` = 1 (the seed autograd starts from) is not multiplied in where it would be the
  last op (x·1 = x exactly);
* the optimizers SGD (momentum, dampening, Nesterov, weight decay), Adam and AdamW (amsgrad
  too) update the gradient buffers in place, through torch._foreach_* on the CPU
  (manual/fast_optim.py; the optimizers' state is created by manual.optim itself);
* the optional layers (manual/fast_layers.py): batch norm (training and eval) runs its forward
  kernel's out= form, layer norm copies its forward's output into a buffer, and both run the
  readable backwards' ops over buffers (the
  column sums with a ChunkedColumnSums plan made once, the row views kept); dropout draws its
  mask into a buffer (the same bernoulli_ and div_ on the same generator); the embedding looks up
  into the flattened first-layer input and adds its gradient rows in index order, and the first
  layer's input gradient is then computed (it is the embedding's).

L2 regularization (``reg`` > 0) runs manual.losses.l2_forward / l2_backward, as the readable
step does, and adds the weight terms into the gradient buffers (x + y in place, the same bits).

What it does not specialise falls back to the readable code, visibly (``specialised`` is False,
``fallback`` says why): an activation or loss it does not know runs the readable step; a step
under autocast (``FastMLP(mlp, autocast="bfloat16" | "float16")``) runs manual.autocast's
AutocastMLP forward and backward, then the foreach update; an optimizer that is not exactly
manual.optim.SGD/Adam/AdamW (a subclass, extra state) runs its own ``step``; an MLP with
residual FFN blocks (manual/blocks.py) runs the readable step whole.  The specialised
step also comes in two halves, ``forward_backward`` (gradients into ``grads``) and
``apply_update`` (those or given ones, e.g. clipped): manual/fast_step.py's FastStep adds the
schedule and clipping of manual/step.py on top (the update reads ``opt.lr`` on every call).  tests/test_fast.py checks bit identity with the readable path and the autograd twin
for every loss × optimizer pair, every activation, reg and bias on/off, and with the readable
path for every optional layer (batch norm train/eval, layer norm, dropout train/eval,
embedding, makemore's embedding + batch norm) × loss × optimizer setting.  The plan depends on
the training mode and the torch thread count too (batch norm's sums follow the thread chunks).  The CUDA-graph capture of this step is manual/cuda_graph.py (CudaGraphStep,
re-exported here).

The parameters are the MLP's own tensors, updated in place.  What the buffers depend on (the
parameter tensors' identity, the activations, the loss, reg) is part of the signature checked on
every step, so replacing a tensor in ``mlp.params`` or changing the loss rebuilds the plan rather
than updating stale tensors; ``reset()`` drops it explicitly.  Shapes: x (N, D), target (N, C)
values or (N,) labels; letters as in manual/__init__.py.

The plan (buffers, forward and backward schedule, loss buffers) is one module because its stages
share buffers and lifetimes; the activations and the update, which only take tensors, are apart.
"""
import torch

from manual import _check
from manual.autocast import AutocastMLP
from manual.cuda_graph import CudaGraphStep, check_graphable, graph_state  # noqa: F401 (re-export)
from manual.fast_activations import (FAST_ACTIVATION_TABLE, IN_PLACE_ACTIVATIONS,  # noqa: F401
                                     relu_backward_over)
from manual.fast_layers import FastBatchNorm, FastDropout, FastEmbedding, FastLayerNorm
from manual.fast_optim import update
from manual.layers import column_major
from manual.kernel_order import LogSoftmaxBackwardExp, NllCascade
from manual.losses import l2_backward, l2_forward, loss_backward, loss_forward, target_kind
from manual.norm import check_batch_rows

FAST_ACTIVATIONS = tuple(FAST_ACTIVATION_TABLE)
FAST_LOSSES = ("sum_squared", "mse", "cross_entropy", "svm")
FAST_NORMS = {"batchnorm": FastBatchNorm, "layernorm": FastLayerNorm}


class _Record:
    """Named fields, set by keyword at construction (the names in __slots__; one not given is
    None).  manual/ imports torch and math only, so no dataclass or NamedTuple."""
    __slots__ = ()

    def __init__(self, **fields):
        unknown = set(fields) - set(self.__slots__)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown fields {sorted(unknown)}")
        for name in self.__slots__:
            setattr(self, name, fields.get(name))

    def values(self):
        return [getattr(self, name) for name in self.__slots__]


class ForwardLayer(_Record):
    """One linear layer and its activation in the forward schedule: wt (the weight, transposed),
    bias (or None), h (the linear output buffer (N, width)), norm (its FastBatchNorm /
    FastLayerNorm, or None), activation (its FastActivation, whose forward(z, **options) gives
    (y, cache); None for the last layer) and its options (slope, alpha, k), drop (its
    FastDropout, or None)."""
    __slots__ = ("wt", "bias", "h", "norm", "activation", "options", "drop")


class BackwardLayer(_Record):
    """One linear layer (and the activation in front of it) in the backward schedule.

    w; gw: dW where W is column-major as the mm writes it, else None and gw_t (dW transposed) is
    written; gb: db (None without a bias); one: the plan's 0-d one (sigmoid's 1 − y); activation:
    the FastActivation in front (None for the first layer), whose backward(dy, cache, layer)
    gives dz; dy: d activation (the first layer's: d embedding), a view of a scratch buffer; tmp:
    the temporary of sigmoid/tanh's backward; y_bits: an in-place activation's output as integers
    (ReLU's mask is written there); norm, drop: the norm and dropout of the layer in front (None
    where it has none), whose backward runs over dz and dy.
    """
    __slots__ = ("w", "gw", "gw_t", "gb", "one", "activation", "dy", "tmp", "y_bits", "norm",
                 "drop", "views")

    def view_of(self, t, kind):
        """t.t() (kind "t") or t as integers (a dtype), kept while t is the same tensor (the plan's
        buffers are; a readable activation's gradient is new every step)."""
        views = self.views if self.views is not None else {}
        self.views = views
        seen = views.get(kind)
        if seen is None or seen[0] is not t:
            seen = views[kind] = (t, t.t() if kind == "t" else t.view(kind))
        return seen[1]


class CrossEntropyBuffers(_Record):
    """cross_entropy's buffers for N rows: logp (N, C), picked (N, 1) and picked_flat (its (N,)
    view: each label's log-probability), g (N, 1) (−1/N, formed as cross_entropy_backward forms
    it), mean (the nll cascade bound to its buffers, NllCascade.bind), exp (the log-softmax
    backward's exp for (N, C), kernel_order.LogSoftmaxBackwardExp), held (the buffers behind
    mean and exp), labels and column (the last labels seen and their (N, 1) view)."""
    __slots__ = ("logp", "picked", "picked_flat", "g", "mean", "exp", "held", "labels", "column")


class Plan(_Record):
    """Buffers and a fixed schedule of ops for one input signature (see FastMLP._build).

    one (0-d); forward_layers (ForwardLayer per layer, first to last); reverse_layers
    (BackwardLayer per layer, last to first); weights and grad_weights (per layer); out (the last
    pre-activation: the output, then d output); sq (the regression losses' diff², a view of
    scratch A, else None); grads (a buffer per parameter name); scratch (buffers A and B, None
    where unused); names, params and grad_list (the update's lists, in the order of mlp.params);
    ce (CrossEntropyBuffers or None); embed (FastEmbedding or None); extra (the optional
    layers' buffers, for held_tensors)."""
    __slots__ = ("one", "forward_layers", "reverse_layers", "weights", "grad_weights", "out",
                 "sq", "grads", "scratch", "names", "params", "grad_list", "ce", "embed", "extra")


class FastMLP:
    """A fast training step for a manual.MLP (see the module docstring)."""

    def __init__(self, mlp, autocast=None):
        """mlp: a manual.MLP with an optimizer.  autocast: None, or "bfloat16" / "float16" (or
        the torch dtype) for the step under torch.autocast (manual/autocast.py's AutocastMLP,
        which checks the net and refuses what it does not mirror, in one line)."""
        if mlp.optimizer is None:
            raise ValueError("mlp: expected an MLP built with an optimizer (it has none)")
        self.mlp = mlp
        self.amp = AutocastMLP(mlp, autocast) if autocast is not None else None
        self.reset()

    @property
    def fallback(self):
        """Why the step runs the readable code (None when it runs the specialised schedule)."""
        mlp = self.mlp
        if mlp.blocks is not None:
            return (f"blocks: {mlp.blocks['n']} residual FFN block(s) have no specialised "
                    f"schedule; the readable step runs them")
        if self.amp is not None:
            return (f"autocast {str(self.amp.dtype).replace('torch.', '')}: not specialised; "
                    f"runs manual.autocast.AutocastMLP's step with the foreach "
                    f"update")
        if any(a not in FAST_ACTIVATIONS for a in mlp.activations):
            return f"activations {mlp.activations}: not all in {FAST_ACTIVATIONS}"
        if mlp.loss not in FAST_LOSSES:
            return f"loss {mlp.loss!r} not in {FAST_LOSSES}"
        return None

    @property
    def specialised(self):
        """True when the step runs the specialised schedule (else the readable fallback)."""
        return self.fallback is None

    def reset(self):
        """Forget the buffers and the plan; the next step validates and builds them again."""
        self._signature = None
        self._plan = None

    # -- validation, once per signature: the checks of MLP.forward ---------------------------
    def _validate(self, x, target):
        self.mlp.check_input(x)
        if self.mlp.norm == "batchnorm":
            check_batch_rows(x, self.mlp.training)
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
        mlp, n, p = self.mlp, x.shape[0], self.mlp.params
        opts = dict(dtype=p["layers.0.weight"].dtype, device=x.device)   # x: tokens with an embedding
        weights = [p[f"layers.{i}.weight"] for i in range(mlp.n_layers)]
        grads = {name: torch.empty_like(t) for name, t in p.items()}
        one = torch.ones((), **opts)
        hs = [torch.empty((n, w.shape[0]), **opts) for w in weights]
        out = hs[-1]
        norms, drops = self._optional_layers(hs[:-1], [w.shape[1] for w in weights[1:]], grads)
        acts = [norm.out if norm is not None else h for norm, h in zip(norms, hs)]
        embed = FastEmbedding(mlp, n, grads) if mlp.embedding is not None else None
        # which scratch buffer (0: A, 1: B) and shape each view takes: (layer, field, index, shape)
        views = [(None, "sq", 0, tuple(out.shape))] if mlp.loss in ("sum_squared", "mse") else []
        reverse = self._reverse_layers(weights, acts, grads, one, views, norms, drops)
        sizes = [max((sh[0] * sh[1] for _, _, k, sh in views if k == j), default=0) for j in (0, 1)]
        scratch = [torch.empty(size, **opts) if size else None for size in sizes]
        sq = None
        for layer, field, k, shape in views:
            view = scratch[k][:shape[0] * shape[1]].view(shape)
            if layer is None:
                sq = view
            else:
                setattr(layer, field, view)
        ce = self._cross_entropy_buffers(n, one, out) if mlp.loss == "cross_entropy" else None
        extra = [t for layer in [*norms, *drops, embed] if layer is not None
                 for t in layer.buffers()]
        self._plan = Plan(
            one=one, forward_layers=self._forward_layers(weights, hs, norms, drops),
            reverse_layers=reverse, embed=embed, extra=extra,
            weights=weights, out=out, sq=sq, grads=grads, scratch=scratch, ce=ce,
            grad_weights=[grads[f"layers.{i}.weight"] for i in range(mlp.n_layers)],
            names=list(p), params=list(p.values()), grad_list=[grads[name] for name in p])

    def _optional_layers(self, hidden_hs, widths, grads):
        """Per hidden layer its norm (over its linear output buffer) and dropout (over its
        activation's output, widths[i] wide; training with p > 0 only: otherwise dropout is the
        identity and draws nothing), None where absent."""
        mlp = self.mlp
        norm = FAST_NORMS.get(mlp.norm)
        norms = [norm(mlp, i, h, grads) if norm else None for i, h in enumerate(hidden_hs)]
        active = mlp.dropout and mlp.training
        drops = [FastDropout(mlp, h.new_empty((h.shape[0], width))) if active else None
                 for h, width in zip(hidden_hs, widths)]
        return norms, drops

    def _forward_layers(self, weights, hs, norms, drops):
        """ForwardLayer per layer, first to last: its linear output buffer hs[i], norm,
        activation and dropout."""
        mlp, layers = self.mlp, []
        for i, w in enumerate(weights):
            hidden = i < mlp.n_layers - 1
            act = mlp.activations[i] if hidden else None
            layers.append(ForwardLayer(
                wt=w.t(), bias=mlp.params.get(f"layers.{i}.bias"), h=hs[i],
                norm=norms[i] if hidden else None, drop=drops[i] if hidden else None,
                activation=FAST_ACTIVATION_TABLE[act] if hidden else None,
                options=mlp._act_options(act) if hidden else {}))
        return layers

    def _reverse_layers(self, weights, acts, grads, one, views, norms, drops):
        """BackwardLayer per layer, last to first; appends to views the scratch view each layer
        needs (d activation, sigmoid/tanh's temporary; with an embedding the first layer's d
        input), placed so that d activation is never written into the buffer d pre-activation
        (the mm's input) is in.  acts[i]: the buffer hidden layer i's activation runs in (its
        norm's output, else its linear output)."""
        mlp, n = self.mlp, acts[0].shape[0]
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[acts[0].element_size()]
        layers = []
        dz_in = None   # the scratch buffer d pre-activation lives in (None: not a scratch one)
        for i in range(mlp.n_layers - 1, -1, -1):
            w = weights[i]
            gw = grads[f"layers.{i}.weight"]
            # linear_backward's dW branch (the layout of W is fixed for the plan)
            layer = BackwardLayer(w=w, gw=gw if column_major(w.t()) else None, gw_t=gw.t(),
                                  gb=grads.get(f"layers.{i}.bias"), one=one)
            free = 1 if dz_in == 0 else 0          # not where d pre-activation (the mm's input) is
            if i == 0 and mlp.embedding is not None:
                views.append((layer, "dy", free, (n, w.shape[1])))   # d embedding (N, T·E)
            if i > 0:
                act = layer.activation = FAST_ACTIVATION_TABLE[mlp.activations[i - 1]]
                layer.norm, layer.drop = norms[i - 1], drops[i - 1]
                width = w.shape[1]                 # layer i−1's activation output (maxout: H)
                views.append((layer, "dy", free, (n, width)))
                if layer.norm is not None and layer.norm.scratch:   # where tmp was, never dz
                    views.append((layer.norm, layer.norm.scratch, 1 - free,
                                  tuple(layer.norm.x.shape)))
                if act.tmp:
                    views.append((layer, "tmp", 1 - free, (n, width)))
                if act.in_place:
                    layer.y_bits = acts[i - 1].view(bits)
                # d pre-activation: over y (tmp), in dy's buffer (in place, no tmp), or new
                dz_in = free if act.in_place and not act.over_y else None
            layers.append(layer)
        return layers

    @staticmethod
    def _cross_entropy_buffers(n, one, out):
        cascade = NllCascade(n, out.device)
        new = lambda *shape: torch.empty(shape, dtype=out.dtype, device=out.device)  # noqa: E731
        g = (-(one / float(n))).expand(n, 1).contiguous()   # as cross_entropy_backward forms it
        sums, kept, total = new(cascade.size), new(cascade.kept.shape[0]), new(1)
        picked, exp = new(n, 1), LogSoftmaxBackwardExp(out.shape, out.dtype, out.device)
        return CrossEntropyBuffers(
            logp=torch.empty_like(out), picked=picked, picked_flat=picked.view(-1), g=g,
            mean=cascade.bind(sums, kept, total), exp=exp, held=[sums, kept, total, *exp.buffers()])

    # -- the step ---------------------------------------------------------------------------
    def train_step(self, x, target):
        """forward, backward, step; returns the loss (before the update), a fresh 0-d tensor."""
        if not self._prepare(x, target):
            return self._readable_step(x, target)
        loss = self._forward_backward(x, target)
        self.apply_update()
        return loss

    def forward_backward(self, x, target):
        """The specialised step's forward and backward alone (no update): returns the loss; the
        gradients are then in ``grads`` (buffers, overwritten by the next step).  ValueError
        where the step is not specialised (``fallback`` says why)."""
        if not self._prepare(x, target):
            raise ValueError(f"fast: no specialised step to run; {self.fallback}")
        return self._forward_backward(x, target)

    def apply_update(self, grads=None):
        """The optimizer's update after ``forward_backward``: with the step's gradient buffers,
        or grads (a dict by parameter name, e.g. clipped copies; overwritten)."""
        plan = self._plan
        if plan is None:
            raise ValueError("fast: apply_update needs the gradients of a step first")
        grad_list = plan.grad_list if grads is None else [grads[name] for name in plan.names]
        update(self.mlp.optimizer, plan.names, plan.params, grad_list)

    def _prepare(self, x, target):
        """Validate and build the plan when the input signature changed.  -> specialised."""
        mlp = self.mlp
        sig = (x.shape, x.dtype, x.device, target.shape, target.dtype, target.device, mlp.loss,
               mlp.reg, tuple(mlp.activations), tuple(map(id, mlp.params.values())),
               mlp.training, tuple(map(id, mlp.buffers.values())), torch.get_num_threads())
        if sig != self._signature:
            self._validate(x, target)
            if self.specialised:
                self._build(x)
            self._signature = sig
        return self.specialised

    def _readable_step(self, x, target):
        if self.amp is not None:
            loss, cache = self.amp.forward(x, target)
            grads = self.amp.backward(cache)
        else:
            loss, cache = self.mlp.forward(x, target)
            grads, _ = self.mlp.backward(cache)
        names = list(self.mlp.params)
        update(self.mlp.optimizer, names, list(self.mlp.params.values()),
               [grads[name] for name in names], copy=True)
        return loss

    def _forward_backward(self, x, target):
        plan = self._plan
        # forward: [embedding], then per layer z = x·Wᵀ + b (one addmm, as linear_forward),
        # [norm into its buffer], the activation in place or (readable activations) from z into
        # a new tensor, [dropout into its buffer]
        a, inputs, caches = x, [], []
        if plan.embed is not None:
            a = plan.embed.forward(x)
        for layer in plan.forward_layers:
            inputs.append(a)
            if layer.bias is not None:
                torch.addmm(layer.bias, a, layer.wt, out=layer.h)
            else:
                torch.mm(a, layer.wt, out=layer.h)
            a, cache = layer.h, None
            if layer.norm is not None:
                a = layer.norm.forward(a)
            if layer.activation is not None:
                a, cache = layer.activation.forward(a, **layer.options)
            if layer.drop is not None:
                a = layer.drop.forward(a)
            caches.append(cache)
        out = plan.out
        loss = self._loss(out, target)
        reg = self.mlp.reg
        if reg:  # R = reg·Σ W², as MLP.forward: loss + l2_forward(weights, reg)
            loss = loss + l2_forward(plan.weights, reg)
        # backward, layer by layer (manual.layers.linear_backward, manual/fast_activations.py)
        dz = out
        for i, layer in zip(range(len(inputs) - 1, -1, -1), plan.reverse_layers):
            x_i = inputs[i]
            if layer.gw is not None:
                torch.mm(layer.view_of(dz, "t"), x_i, out=layer.gw)   # dW = doutᵀ·x
            else:
                torch.mm(x_i.t(), dz, out=layer.gw_t)    # (xᵀ·dout)ᵀ for a transposed weight
            if layer.gb is not None:
                torch.sum(dz, 0, out=layer.gb)           # db = Σₙ dout
            if i == 0 and plan.embed is None:
                break
            dy = layer.dy                                # d x_i: layer i−1's output or embedding
            if column_major(x_i):                       # d x_i = dout·W, autograd's branch
                torch.mm(layer.w.t(), layer.view_of(dz, "t"), out=dy.t())
            else:
                torch.mm(dz, layer.w, out=dy)
            if i == 0:
                plan.embed.backward(dy)
                break
            if layer.drop is not None:
                dy = layer.drop.backward(dy)
            dz = layer.activation.backward(dy, caches[i - 1], layer)
            if layer.norm is not None:
                dz = layer.norm.backward(dz)
        if reg:  # dW += reg·2W (l2_backward with dloss = 1): the second use of each W
            for gw, dweight_reg in zip(plan.grad_weights, l2_backward(plan.one, plan.weights, reg)):
                gw.add_(dweight_reg)
        return loss

    def _loss(self, out, target):
        """The loss of the output buffer out; leaves d loss / d out in out."""
        name = self.mlp.loss
        if name in ("sum_squared", "mse"):
            # manual.losses: diff = y_pred − target, formed in the output buffer
            sq = self._plan.sq
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
        out.copy_(loss_backward(name, self._plan.one, cache))
        return loss

    def _cross_entropy(self, out, labels):
        """manual.losses.cross_entropy_forward and _backward (dloss = 1), op for op, into the
        buffers; d output is written into out (the logits are not read after log_softmax)."""
        ce = self._plan.ce
        _check.labels(labels, out.shape[1])
        if labels is not ce.labels:     # a view sees in-place writes: kept while labels is kept
            ce.labels, ce.column = labels, labels.unsqueeze(1)
        logp = torch.log_softmax(out, 1, out=ce.logp)
        torch.gather(logp, 1, ce.column, out=ce.picked)
        if out.device.type == "cpu":
            loss = ce.mean(ce.picked_flat)
        else:  # as cross_entropy_forward off the CPU
            loss = -(ce.picked_flat.sum()) / float(out.shape[0])
        # dlogp = −(1/N) at [i, labelᵢ], 0 elsewhere (formed in out); its row sums are that one
        # value, exactly; then dlogp − e·g, one FMA (addcmul_ is addcmul's kernel with out=self)
        e = ce.exp(logp)
        out.zero_().scatter_(1, ce.column, ce.g).addcmul_(e, ce.g, value=-1)
        return loss

    def held_tensors(self):
        """Every tensor this step keeps from one call to the next: the parameters, the optimizer's
        state and the fast path's buffers (what peak-memory accounting counts as held)."""
        tensors = list(self.mlp.params.values())
        for value in vars(self.mlp.optimizer).values():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif isinstance(value, dict):
                tensors += [t for t in value.values() if isinstance(t, torch.Tensor)]
        plan = self._plan
        if plan is not None:
            tensors += list(plan.grads.values()) + [plan.one] + list(plan.scratch)
            if plan.ce is not None:
                tensors += [plan.ce.logp, plan.ce.picked, plan.ce.g, *plan.ce.held]
            tensors += [layer.h for layer in plan.forward_layers] + plan.extra
        return [t for t in tensors if t is not None]

    @property
    def grads(self):
        """The gradients of the last specialised step, by parameter name (None before one)."""
        return None if self._plan is None else dict(self._plan.grads)
