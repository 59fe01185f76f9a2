"""A multilayer perceptron stacked from the manual ops, with a hand-written backward pass.

Layer i is ``linear (layers.i.weight, layers.i.bias) -> [norm i] -> activation i -> [dropout]``;
the last layer has no norm, activation or dropout and feeds the loss.  Parameter names equal the
autograd twin's ``state_dict`` keys, so gradients compare by name.  A Maxout hidden layer of width
H has a linear layer of H·K outputs.

Optional layers, in CS231n's FullyConnectedNet order:
  norm       "batchnorm" / "layernorm" after each hidden linear layer (norms.i.weight,
             norms.i.bias; batch norm also the buffers norms.i.running_mean,
             norms.i.running_var, norms.i.num_batches_tracked);
  dropout    p after each hidden activation;
  embedding  {"vocab", "dim", "context"} in front (embed.weight (V, E)): integer x (N, T) is
             looked up and flattened to (N, T·E);
  blocks     {"n", "width", "hidden", "norm", "activation"}: n residual FFN blocks
             (manual/blocks.py; blocks.{b}.norm / .fc1 / .fc2) between the last hidden layer and
             the head: the layers up to sizes[-2] are the input projection to the blocks' width
             D = sizes[-2], then h ← h + fc2(act(fc1(LN(h)))) per block, then the head.

Shapes: x (N, D); sizes = [D, H1, …, C]; output (N, C); target (N, C) values or (N,) labels.
"""
import math

import torch

from manual import _check
from manual.activations import activation_backward, activation_forward, activation_list
from manual.blocks import (block_param_names, block_settings, blocks_backward, blocks_forward,
                           check_block_params, init_block_params)
from manual.cache import Cache, record
from manual.dropout import dropout_backward, dropout_forward
from manual.embedding import embedding_backward, embedding_forward
from manual.layers import linear_backward, linear_forward
from manual.losses import l2_backward, l2_forward, loss_backward, loss_forward, target_kind
from manual.norm import batchnorm_backward, batchnorm_forward, layernorm_backward, layernorm_forward

INIT_SCHEMES = ("uniform", "randn")


class LayerCache(Cache):
    """One layer's caches, in forward order; norm, activation and dropout are None where the
    layer has none (the last layer: linear only)."""
    fields = ("linear", "norm", "activation", "dropout")
    __slots__ = fields


class ForwardCache(Cache):
    """What MLP.backward needs: the layers' caches (a list of LayerCache), the embedding's (or
    None), the loss's and the residual blocks' (a list, or None without blocks)."""
    fields = ("layers", "embedding", "loss", "blocks")
    __slots__ = fields


def linear_widths(sizes, activations, k=2):
    """Output width of each linear layer (H·K in front of a Maxout)."""
    return [sizes[i + 1] * (k if i < len(activations) and activations[i] == "maxout" else 1)
            for i in range(len(sizes) - 1)]


def init_params(sizes, activation="sigmoid", bias=True, *, scheme="uniform", seed=0,
                dtype=torch.float64, device="cpu", k=2, norm=None, embedding=None, blocks=None):
    """Seeded parameters in nn.Linear layout, identical on every device.

    Drawn in float64 on the CPU from one torch.Generator, then cast: "uniform" is nn.Linear's
    default distribution U(−1/√D, 1/√D); "randn" is the document's standard normal.  A norm's
    weight starts at 1 and its bias at 0 (nn.BatchNorm1d / nn.LayerNorm); the embedding table is
    N(0, 1) (nn.Embedding), drawn after the layers; the residual blocks (manual.blocks
    .init_block_params, nn.Linear's uniform whatever the scheme) are drawn last, from the same
    generator, so a spec without blocks keeps its parameters.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init: unknown scheme {scheme!r}; expected one of {', '.join(INIT_SCHEMES)}")
    norm = _check.check_norm(norm)
    embedding = _check.check_embedding(embedding)
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
    if norm is not None:
        for i, width in enumerate(linear_widths(sizes, acts, k)[:-1]):
            params[f"norms.{i}.weight"] = torch.ones(width, dtype=dtype, device=device)
            params[f"norms.{i}.bias"] = torch.zeros(width, dtype=dtype, device=device)
    if embedding is not None:
        shape = (embedding["vocab"], embedding["dim"])
        params["embed.weight"] = torch.randn(shape, generator=gen, dtype=torch.float64).to(
            dtype=dtype, device=device)
    if blocks is not None:
        b = block_settings(blocks)
        params.update(init_block_params(b["n"], b["width"], b["hidden"], b["norm"], generator=gen,
                                        dtype=dtype, device=device))
    return params


def init_buffers(widths, norm=None, *, dtype=torch.float64, device="cpu"):
    """Batch norm's running statistics at nn.BatchNorm1d's start: mean 0, var 1, 0 batches.
    widths: the output width of each hidden linear layer.  Other norms keep none."""
    buffers = {}
    if norm == "batchnorm":
        for i, width in enumerate(widths):
            buffers[f"norms.{i}.running_mean"] = torch.zeros(width, dtype=dtype, device=device)
            buffers[f"norms.{i}.running_var"] = torch.ones(width, dtype=dtype, device=device)
            buffers[f"norms.{i}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long,
                                                                     device=device)
    return buffers



class MLP:
    """Manual-backprop MLP.

    params: dict of tensors named ``layers.{i}.weight`` (out, in) / ``layers.{i}.bias`` (out,)
    (and the optional layers' names, module docstring).
    activation: one name or one per hidden layer.  loss: a name of manual.losses.LOSSES.
    optimizer: an object with ``step(params, grads)`` (manual.optim), needed only by ``step``.
    options: slope (leaky_relu), alpha (elu), k (maxout pieces).
    reg: L2 regularization strength; the loss becomes data loss + reg·Σ W² (weights only).
    norm, dropout, momentum, eps, embedding, blocks: the optional layers (module docstring);
    the blocks' layer norms use eps too, their activation slope / alpha.  reg covers the
    layers.* weights only, not the blocks' (the twin's L2Regularized sums the same).
    buffers: batch norm's running statistics by name (default: init_buffers); updated in place.
    generator: the torch.Generator dropout draws its masks from (None: the default generator;
    manual/dropout.py says how the twin draws the same masks).  ``train()`` / ``eval()`` switch
    batch norm and dropout between training and evaluation, as nn.Module does.
    """

    def __init__(self, params, activation="sigmoid", loss="sum_squared", optimizer=None, *,
                 slope=0.1, alpha=1.0, k=2, reg=0.0, norm=None, dropout=0.0, momentum=0.1,
                 eps=1e-5, embedding=None, blocks=None, buffers=None, generator=None):
        self.norm = _check.check_norm(norm)
        self.dropout = _check.check_dropout(dropout)
        self.embedding = _check.check_embedding(embedding)
        self.blocks = None if blocks is None else block_settings(blocks)
        self.momentum, self.eps = _check.mlp_norm_settings(momentum, eps)
        names = () if blocks is None else block_param_names(self.blocks["n"], self.blocks["norm"])
        self.n_layers = _check.mlp_params(params, self.norm, self.embedding, set(names))
        self.activations = activation_list(activation, self.n_layers - 1)
        _check.mlp_widths(params, self.n_layers, self.activations, k)
        _check.mlp_optional_layers(params, self.n_layers, self.norm, self.embedding)
        target_kind(loss)  # validates the name
        self.params, self.loss, self.optimizer = params, loss, optimizer
        self.options = {"slope": slope, "alpha": alpha, "k": k}
        if self.blocks is not None:
            self._check_blocks(params)
        self.reg = _check.number("reg", reg, low=0)
        self.buffers = self._buffers(buffers)
        self.generator = generator
        self.training = True

    def _check_blocks(self, params):
        """The blocks sit in the head's input width, behind at least one hidden layer."""
        head_in = params[f"layers.{self.n_layers - 1}.weight"].shape[1]
        if self.n_layers < 2 or head_in != self.blocks["width"]:
            raise ValueError(f"blocks.width: {self.blocks['width']} must equal the last hidden "
                             f"width (the head's input), got sizes {self.sizes}")
        check_block_params(params, self.blocks)

    def _buffers(self, buffers):
        first = self.params["layers.0.weight"]
        widths = [self.params[f"layers.{i}.weight"].shape[0] for i in range(self.n_layers - 1)]
        expected = init_buffers(widths, self.norm, dtype=first.dtype, device=first.device)
        if buffers is None:
            return expected
        if not isinstance(buffers, dict) or set(buffers) != set(expected):
            raise ValueError(f"buffers: expected names {sorted(expected)}, got "
                             f"{sorted(buffers) if isinstance(buffers, dict) else buffers!r}")
        return buffers

    def train(self, mode=True):
        """Training mode (batch statistics, dropout on) or, with mode False, evaluation mode."""
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

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
        """x must be a non-empty (N, D) floating tensor with the parameters' dtype and device
        ((N, T) integer token indices with an embedding)."""
        if self.embedding is not None:
            _check.mlp_tokens(x, self.embedding)
            return
        _check.mlp_input(x, self.params["layers.0.weight"])

    def _norm_forward(self, i, z):
        w, b = self.params[f"norms.{i}.weight"], self.params[f"norms.{i}.bias"]
        if self.norm == "layernorm":
            return layernorm_forward(z, w, b, self.eps)
        return batchnorm_forward(z, w, b, self.buffers[f"norms.{i}.running_mean"],
                                 self.buffers[f"norms.{i}.running_var"], training=self.training,
                                 momentum=self.momentum, eps=self.eps,
                                 num_batches_tracked=self.buffers[f"norms.{i}.num_batches_tracked"])

    def predict(self, x, trace=None):
        """Forward through the layers only.  x (N, D) -> output (N, C), per-layer caches.

        trace: a dict to record each pre-activation and activation in, or None (with the
        optional layers also embed.output, layers.{i}.linear (before the norm), norms.{i}.mean,
        norms.{i}.invstd, layers.{i}.dropout, each block's values (manual.blocks.block_forward:
        blocks.{b}.norm, …) and blocks.output (the head's input); backward adds
        layers.{i}.grad_dropout, layers.{i}.grad_linear, each block's gradients
        (block_backward) and blocks.grad_input).
        """
        self.check_input(x)
        layer_caches = []
        h, emb_cache, block_caches = x, None, None
        if self.embedding is not None:
            emb, emb_cache = embedding_forward(x, self.params["embed.weight"])
            h = emb.view(emb.shape[0], -1)                   # (N, T, E) -> (N, T·E)
            record(trace, "embed.output", h)
        for i in range(self.n_layers):
            if i == self.n_layers - 1 and self.blocks is not None:
                h, block_caches = self._blocks_forward(h, trace)
                record(trace, "blocks.output", h)
            z, lin_cache = linear_forward(h, self.params[f"layers.{i}.weight"],
                                          self.params.get(f"layers.{i}.bias"))
            h, norm_cache, act_cache, drop_cache = z, None, None, None
            if i < self.n_layers - 1:
                if self.norm is not None:
                    record(trace, f"layers.{i}.linear", z)
                    z, norm_cache = self._norm_forward(i, z)
                    record(trace, f"norms.{i}.mean", norm_cache.mean)      # μ per feature (batch
                    record(trace, f"norms.{i}.invstd", norm_cache.invstd)  # norm) or row (layer norm)
                record(trace, f"layers.{i}.pre_activation", z)
                act = self.activations[i]
                h, act_cache = activation_forward(act, z, **self._act_options(act))
                record(trace, f"layers.{i}.activation", h)
                h, drop_cache = dropout_forward(h, self.dropout, training=self.training,
                                                generator=self.generator)
                if self.dropout:
                    record(trace, f"layers.{i}.dropout", h)
            else:
                record(trace, f"layers.{i}.pre_activation", z)
            layer_caches.append(LayerCache(lin_cache, norm_cache, act_cache, drop_cache))
        return h, ForwardCache(layer_caches, emb_cache, blocks=block_caches)

    def _blocks_forward(self, h, trace=None):
        b = self.blocks
        return blocks_forward(h, self.params, b["n"], b["activation"], b["norm"], self.eps,
                              trace=trace,
                              **self._act_options(b["activation"]))

    def forward(self, x, target, trace=None):
        """x (N, D), target (N, C) values or (N,) labels -> scalar loss, cache for backward."""
        out, cache = self.predict(x, trace)
        loss, loss_cache = loss_forward(self.loss, out, target)
        if self.reg:
            loss = loss + l2_forward(self._weights(), self.reg)
        record(trace, "output", out)
        record(trace, "loss", loss)
        return loss, cache.replace(loss=loss_cache)

    def backward(self, cache, dloss=None, trace=None):
        """cache from forward -> grads (name -> tensor shaped like the parameter), dx (N, D).

        The forward in reverse: dloss → d output → per layer (d dropout → d activation →
        d norm → d pre-activation → dW, db, d input; after the head, the residual blocks last
        first) → d embedding.  dloss defaults to 1, the
        seed autograd starts from.  With an embedding, dx is the gradient of the flattened
        lookup (N, T·E).
        """
        if dloss is None:
            w0 = self.params["layers.0.weight"]
            dloss = torch.ones((), dtype=w0.dtype, device=w0.device)
        dh = loss_backward(self.loss, dloss, cache.loss)
        record(trace, "grad_output", dh)
        grads = {}
        for i in reversed(range(self.n_layers)):
            lin_cache, norm_cache, act_cache, drop_cache = cache.layers[i]
            if i < self.n_layers - 1:
                if self.dropout:
                    record(trace, f"layers.{i}.grad_dropout", dh)
                dh = dropout_backward(dh, drop_cache)
                record(trace, f"layers.{i}.grad_activation", dh)
                dh = activation_backward(self.activations[i], dh, act_cache)
            record(trace, f"layers.{i}.grad_pre_activation", dh)
            if norm_cache is not None:
                norm_backward = layernorm_backward if self.norm == "layernorm" else batchnorm_backward
                dh, grads[f"norms.{i}.weight"], grads[f"norms.{i}.bias"] = norm_backward(dh, norm_cache)
                record(trace, f"layers.{i}.grad_linear", dh)
            dh, dweight, dbias = linear_backward(dh, lin_cache)
            grads[f"layers.{i}.weight"] = dweight
            if dbias is not None:
                grads[f"layers.{i}.bias"] = dbias
            if i == self.n_layers - 1 and cache.blocks is not None:
                # the residual blocks, last first (the split and sum: manual.blocks.block_backward)
                dh, block_grads = blocks_backward(dh, cache.blocks, trace)
                grads.update(block_grads)
                record(trace, "blocks.grad_input", dh)
        if cache.embedding is not None:
            idx = cache.embedding.idx
            grads["embed.weight"] = embedding_backward(dh.view(*idx.shape, -1), cache.embedding)
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
