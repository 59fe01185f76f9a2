"""The autograd twin: the same MLP as stock PyTorch pieces (nn.Linear, activation modules, a
torch loss, torch.optim), so that autograd — not this file — computes its gradients."""
import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import manual
import manual.blocks
import manual.clip
import manual.mlp
import manual.schedules


class Maxout(nn.Module):
    """max over each group of k consecutive features: (N, H·k) -> (N, H), via max(dim)."""

    def __init__(self, k=2):
        super().__init__()
        self.k = k

    def forward(self, z):
        return z.view(z.shape[0], z.shape[1] // self.k, self.k).max(2).values

    def extra_repr(self):
        return f"k={self.k}"


def activation_module(name, slope=0.1, alpha=1.0, k=2):
    makers = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU,
              "leaky_relu": lambda: nn.LeakyReLU(slope), "elu": lambda: nn.ELU(alpha),
              "maxout": lambda: Maxout(k), "identity": nn.Identity,
              "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU}
    if name not in makers:
        raise ValueError(f"activation: unknown name {name!r}; expected one of {', '.join(makers)}")
    return makers[name]()


def loss_module(name, reg=0.0, twin=None):
    """The stock torch loss for a spec's loss name; with reg > 0, wrapped in L2Regularized.

    "svm" is nn.MultiMarginLoss(margin=1): CS231n's multiclass SVM loss divided by the number
    of classes C (see manual/losses.py and docs/spec.md).
    """
    makers = {"sum_squared": lambda: nn.MSELoss(reduction="sum"), "mse": nn.MSELoss,
              "cross_entropy": nn.CrossEntropyLoss, "svm": lambda: nn.MultiMarginLoss(margin=1.0)}
    if name not in makers:
        raise ValueError(f"loss: unknown name {name!r}; expected one of {', '.join(makers)}")
    if reg:
        if twin is None:
            raise ValueError("twin: reg > 0 needs the twin whose weights it regularizes")
        return L2Regularized(makers[name](), twin, reg)
    return makers[name]()


class L2Regularized(nn.Module):
    """data loss + reg · Σ_layers W.pow(2).sum(), weights only (biases are not regularized).

    The weights are read from the twin at every call, so autograd sees W used twice (linear and
    pow) and AccumulateGrad adds the two gradients.
    """

    def __init__(self, base, twin, reg):
        super().__init__()
        self.base = base
        self.reg = float(reg)
        self._twin = [twin]  # a list, so the twin is not registered as a submodule

    def forward(self, out, target):
        total = None
        for layer in self._twin[0].layers:
            s = layer.weight.pow(2).sum()
            total = s if total is None else total + s
        return self.base(out, target) + total * self.reg


class FFNBlock(nn.Module):
    """The transformer's MLP block as plain modules: h + fc2(act(fc1(norm(h)))), the residual
    add in forward; norm is nn.LayerNorm(width) or absent.  manual/blocks.py is its manual side."""

    def __init__(self, width, hidden, activation="relu", norm="layer", *, eps=1e-5, slope=0.1,
                 alpha=1.0, dtype=torch.float64, device="cpu"):
        super().__init__()
        manual.blocks.check_block_settings(activation, norm)
        if norm == "layer":
            self.norm = nn.LayerNorm(width, eps=eps, dtype=dtype, device=device)
        self.fc1 = torch.nn.utils.skip_init(nn.Linear, width, hidden, dtype=dtype, device=device)
        self.act = activation_module(activation, slope, alpha)
        self.fc2 = torch.nn.utils.skip_init(nn.Linear, hidden, width, dtype=dtype, device=device)

    def forward(self, h):
        u = self.norm(h) if hasattr(self, "norm") else h
        return h + self.fc2(self.act(self.fc1(u)))


def ffn_blocks(n, width, hidden, activation="relu", norm="layer", **options):
    """n FFNBlocks in an nn.ModuleList (state_dict names blocks.{i}.… under a `blocks` attribute)."""
    return nn.ModuleList(FFNBlock(width, hidden, activation, norm, **options) for _ in range(n))


CUDA_DROPOUT = ("dropout: not supported on device cuda (CUDA's fused native_dropout kernel draws its "
                "masks from the Philox generator in its own order, which manual's bernoulli_ "
                "cannot reproduce); use device cpu or dropout 0")


class Twin(nn.Module):
    """layers: ModuleList of nn.Linear; acts: one activation module per hidden layer; optional
    embed (nn.Embedding) in front, norms (nn.BatchNorm1d / nn.LayerNorm) after each hidden linear
    layer, drops (nn.Dropout) after each hidden activation — CS231n FullyConnectedNet's order;
    optional blocks (an nn.ModuleList of FFNBlock, registered last) between the last hidden layer
    and the head, each adding its residual in its own forward.

    Dropout draws from the default CPU generator, as nn.Dropout always does, but inside
    torch.random.fork_rng with the twin's own saved state (seeded with ``seed``): the twin's masks
    are then the ones manual.MLP draws from torch.Generator().manual_seed(seed) (manual/dropout.py),
    and nothing else that uses the global generator moves either stream.
    """

    def __init__(self, sizes, activation="sigmoid", bias=True, *, slope=0.1, alpha=1.0, k=2,
                 dtype=torch.float64, device="cpu", norm=None, dropout=0.0, momentum=0.1,
                 eps=1e-5, embedding=None, blocks=None, seed=0):
        super().__init__()
        if manual.check_dropout(dropout) and str(device).startswith("cuda"):
            raise ValueError(CUDA_DROPOUT)
        acts = manual.mlp.activation_list(activation, len(sizes) - 2)
        widths = manual.mlp.linear_widths(sizes, acts, k)
        embedding = manual.check_embedding(embedding)
        if embedding is not None:
            self.embed = torch.nn.utils.skip_init(nn.Embedding, embedding["vocab"], embedding["dim"],
                                                  dtype=dtype, device=device)
        # skip_init: no draw from the global RNG; the parameters are copied in afterwards.
        self.layers = nn.ModuleList(
            torch.nn.utils.skip_init(nn.Linear, d_in, width, bias=bias, dtype=dtype, device=device)
            for d_in, width in zip(sizes[:-1], widths))
        self.acts = nn.ModuleList(activation_module(a, slope, alpha, k) for a in acts)
        norm = manual.check_norm(norm)
        if norm == "batchnorm":
            self.norms = nn.ModuleList(nn.BatchNorm1d(w, eps=eps, momentum=momentum, dtype=dtype,
                                                      device=device) for w in widths[:-1])
        elif norm == "layernorm":
            self.norms = nn.ModuleList(nn.LayerNorm(w, eps=eps, dtype=dtype, device=device)
                                       for w in widths[:-1])
        if blocks is not None:
            b = manual.blocks.block_settings(blocks)
            self.blocks = ffn_blocks(b["n"], b["width"], b["hidden"], b["activation"], b["norm"],
                                     eps=eps, slope=slope, alpha=alpha, dtype=dtype, device=device)
        self.p = manual.check_dropout(dropout)
        if self.p:
            self.drops = nn.ModuleList(nn.Dropout(self.p) for _ in acts)
            self._rng_state = torch.Generator().manual_seed(seed).get_state()
        self.fixed_masks = False  # True: every forward redraws the same masks (finite differences)

    def forward(self, x):
        if not (self.p and self.training):
            return self._forward(x)
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            out = self._forward(x)
            if not self.fixed_masks:
                self._rng_state = torch.get_rng_state()
        return out

    def _forward(self, x):
        if hasattr(self, "embed"):
            x = self.embed(x)
            x = x.view(x.shape[0], -1)
        for i, layer in enumerate(self.layers):
            if i == len(self.acts) and hasattr(self, "blocks"):
                for block in self.blocks:
                    x = block(x)
            x = layer(x)
            if i < len(self.acts):
                if hasattr(self, "norms"):
                    x = self.norms[i](x)
                x = self.acts[i](x)
                if self.p:
                    x = self.drops[i](x)
        return x


def _copy_into(named, given, what):
    """Copy `given` (name -> tensor) into the twin's tensors `named` (name -> tensor), checking
    that the names and shapes match exactly."""
    if set(named) != set(given):
        raise ValueError(f"{what}: expected names {sorted(named)}, got {sorted(given)}")
    with torch.no_grad():
        for name, t in named.items():
            if t.shape != given[name].shape:
                raise ValueError(f"{what}[{name!r}]: expected shape {list(t.shape)}, "
                                 f"got {list(given[name].shape)}")
            t.copy_(given[name])


def load_params(twin, params):
    """Copy a dict of tensors named like twin's parameters into the twin (shapes must match)."""
    _copy_into(dict(twin.named_parameters()), params, "params")


def load_buffers(twin, buffers):
    """Copy batch norm's running statistics (named like twin.state_dict()) into the twin."""
    _copy_into(dict(twin.named_buffers()), buffers, "buffers")


def buffers_of(twin):
    """The twin's buffers (running statistics) as a dict of clones."""
    return {name: b.detach().clone() for name, b in twin.named_buffers()}


def params_of(twin):
    """The twin's parameters as a dict of detached clones."""
    return {name: p.detach().clone() for name, p in twin.named_parameters()}


def grads_of(twin):
    """The twin's parameter gradients after a backward, as a dict named like its state_dict
    (``layers.{i}.weight`` / ``layers.{i}.bias``) — the names of the manual MLP's gradients, so
    the two compare by name.  A parameter that took no part in the backward maps to None.

    >>> import torch, refnet
    >>> spec = refnet.Spec.from_dict({"sizes": [2, 3, 1], "data": "xor"})
    >>> pair = refnet.build_pair(spec)
    >>> x, target = refnet.load_data(spec)
    >>> pair.twin_loss(pair.twin(x), target).backward()
    >>> sorted(refnet.grads_of(pair.twin))
    ['layers.0.bias', 'layers.0.weight', 'layers.1.bias', 'layers.1.weight']

    The grads are the live ``.grad`` tensors (not copies): clone them to keep them past the next
    ``zero_grad``.
    """
    return {name: p.grad for name, p in twin.named_parameters()}


def make_optimizer(twin, name, **settings):
    """The stock torch.optim optimizer for the twin's parameters, single-tensor path (foreach=False).

    foreach=False is CPU's default anyway; on CUDA it keeps the per-tensor arithmetic that
    manual/optim.py mirrors instead of the _foreach_* kernels.
    """
    makers = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name not in makers:
        raise ValueError(f"optimizer.name: unknown name {name!r}; expected one of {', '.join(makers)}")
    return makers[name](twin.parameters(), **settings, foreach=False)


def make_scheduler(optimizer, config, steps):
    """The stock torch.optim.lr_scheduler for a spec's ``lr_schedule`` over ``steps`` optimizer
    steps (None: no schedule); arguments from manual.schedules.schedule_settings, so both sides
    read one set of defaults.  warmup_cosine is LinearLR then CosineAnnealingLR via SequentialLR."""
    if config is None:
        return None
    s = manual.schedules.schedule_settings(config, steps)
    lr_sched = torch.optim.lr_scheduler
    if s["name"] == "step":
        return lr_sched.StepLR(optimizer, s["step_size"], s["gamma"])
    if s["name"] == "cosine":
        return lr_sched.CosineAnnealingLR(optimizer, s["T_max"], s["eta_min"])
    warmup = lr_sched.LinearLR(optimizer, s["start_factor"], 1.0, s["warmup_steps"])
    cosine = lr_sched.CosineAnnealingLR(optimizer, s["T_max"], s["eta_min"])
    return lr_sched.SequentialLR(optimizer, [warmup, cosine], [s["warmup_steps"]])


def clip_grads(twin, config):
    """torch.nn.utils.clip_grad_norm_ over the twin's parameters with a spec's ``clip_grad_norm``
    (its defaults otherwise: foreach on CPU and CUDA, error_if_nonfinite False); -> the total norm."""
    c = manual.clip.clip_settings(config)
    return torch.nn.utils.clip_grad_norm_(twin.parameters(), c["max_norm"], norm_type=c["norm_type"])


def autocast_step(twin, loss_fn, optimizer, x, target, dtype, scaler=None, clip=None):
    """One training step as a mixed-precision script writes it (the twin's side of
    manual.autocast.AutocastMLP.train_step); x, target one batch or lists of k micro-batches:

        optimizer.zero_grad()
        for x, y in micro_batches:
            with torch.autocast(device, dtype):  # entered once per forward: fresh weight casts
                loss = loss_fn(twin(x), y) / k   # forward and loss under autocast
            scaler.scale(loss).backward()        # (without a scaler: loss.backward())
        scaler.unscale_(optimizer)               # (with clip only)
        clip_grad_norm_(twin.parameters(), **clip)
        scaler.step(optimizer); scaler.update()  # (without a scaler: optimizer.step())

    dtype: torch.bfloat16 / torch.float16; scaler: a torch.amp.GradScaler or None; clip: a
    spec's clip_grad_norm or None.  -> dict: loss (float32, Σ loss_i / k, detached), stepped
    (whether the optimizer stepped), total_norm (clip_grad_norm_'s, detached; None without
    clip).  Whether GradScaler skipped is read from its per-optimizer record of the inf check
    (a private field; the public API does not say).
    """
    micro = list(zip(x, target)) if isinstance(x, (list, tuple)) else [(x, target)]
    optimizer.zero_grad()
    loss = None
    for i, (xb, tb) in enumerate(micro):
        # under DDP the first k − 1 micro-batches accumulate locally (no_sync), the last backward
        # all-reduces the sum (harness._twin_grads' idiom)
        local = i < len(micro) - 1 and isinstance(twin, DistributedDataParallel)
        with twin.no_sync() if local else contextlib.nullcontext():
            with torch.autocast(xb.device.type, dtype=dtype):
                loss_i = loss_fn(twin(xb), tb) / len(micro)
            (loss_i if scaler is None else scaler.scale(loss_i)).backward()
        loss = loss_i.detach() if loss is None else loss + loss_i.detach()
    out = {"loss": loss, "stepped": True, "total_norm": None}
    if clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        out["total_norm"] = clip_grads(twin, clip).detach()
    if scaler is None:
        optimizer.step()
        return out
    scaler.step(optimizer)
    out["stepped"] = not sum(float(v) for v in scaler._found_inf_per_device(optimizer).values())
    scaler.update()
    return out


def make_grad_scaler(settings, device="cpu"):
    """torch.amp.GradScaler(device, **settings), or None for settings None (a spec's
    ``scaler_settings``: the four GradScaler settings, torch's defaults filled in)."""
    return None if settings is None else torch.amp.GradScaler(str(device).split(":")[0], **settings)
