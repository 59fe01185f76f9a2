"""Residual feed-forward blocks, the transformer's MLP block, each a forward/backward pair.

    block i:   u = LN(h)           (optional: norm "layer"; else u = h)
               z = u·W₁ᵀ + b₁      fc1 (H, D)
               a = act(z)          any name of manual.ACTIVATIONS except maxout
               v = a·W₂ᵀ + b₂      fc2 (D, H)
               h ← h + v           the residual add

Parameters, named as the twin's state_dict (refnet/twin.py FFNBlock): ``blocks.{i}.norm.weight``
/ ``.bias`` (D,), ``blocks.{i}.fc1.weight`` (H, D) / ``.bias`` (H,), ``blocks.{i}.fc2.weight``
(D, H) / ``.bias`` (D,).

Shapes: h (N, D) in and out; N batch, D the blocks' width, H their hidden width.

Bits: every op is an existing manual pair (linear: addmm forward, autograd's operand order
backward; layer norm: the kernel's lane order; the activations), so a block is bitwise wherever
those are.  The residual is the one new thing: h feeds two paths (the add and the branch), and
autograd sums the two gradients in the producer's input buffer with one add — ``dout + dh_branch``,
commutative, so exact whichever arrives first.
"""
import math

import torch

from manual.activations import activation_backward, activation_forward, activation_list
from manual.cache import record
from manual.layers import linear_backward, linear_forward
from manual.norm import layernorm_backward, layernorm_forward

BLOCK_NORMS = ("layer", None)


def check_block_settings(activation, norm):
    """The block's activation (a manual.ACTIVATIONS name other than maxout) and norm."""
    if activation == "maxout":
        raise ValueError("blocks.activation: maxout changes the width; expected an elementwise "
                         "activation")
    if not isinstance(activation, str):
        raise ValueError(f"blocks.activation: expected one activation name, got {activation!r}")
    try:
        activation_list(activation, 1)                    # validates the name
    except ValueError as exc:                             # named as the spec's key
        raise ValueError(f"blocks.{exc}") from None
    if norm not in BLOCK_NORMS:
        raise ValueError(f"blocks.norm: expected 'layer' or null, got {norm!r}")


def block_settings(config):
    """A spec's ``blocks`` object -> {"n", "width", "hidden", "norm", "activation"}, validated;
    norm defaults to "layer", activation to "relu" (nn.TransformerEncoderLayer's default)."""
    keys = ("n", "width", "hidden", "norm", "activation")
    if not isinstance(config, dict):
        raise ValueError(f"blocks: expected an object with n, width, hidden, got {config!r}")
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise ValueError(f"blocks.{unknown[0]}: unknown setting; expected among {', '.join(keys)}")
    out = {"norm": config.get("norm", "layer"), "activation": config.get("activation", "relu")}
    for key in ("n", "width", "hidden"):
        v = config.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"blocks.{key}: expected an integer >= 1, got {v!r}")
        out[key] = v
    check_block_settings(out["activation"], out["norm"])
    return {key: out[key] for key in keys}


def block_param_names(n, norm="layer", prefix="blocks"):
    """The parameter names of n blocks, in init_block_params' order."""
    kinds = (("norm",) if norm == "layer" else ()) + ("fc1", "fc2")
    return [f"{prefix}.{i}.{layer}.{kind}" for i in range(n) for layer in kinds
            for kind in ("weight", "bias")]


def check_block_params(params, settings, prefix="blocks"):
    """Every block parameter of settings ({"n", "width", "hidden", "norm", ...}) present in params
    with its shape: norm (D,), fc1 (H, D) / (H,), fc2 (D, H) / (D,)."""
    d, h = settings["width"], settings["hidden"]
    shapes = {"norm.weight": [d], "norm.bias": [d], "fc1.weight": [h, d], "fc1.bias": [h],
              "fc2.weight": [d, h], "fc2.bias": [d]}
    for name in block_param_names(settings["n"], settings["norm"], prefix):
        if name not in params:
            raise ValueError(f"params: missing {name!r} (blocks)")
        expected, got = shapes[name.split(".", 2)[2]], list(params[name].shape)
        if got != expected:
            raise ValueError(f"params[{name!r}]: expected shape {expected}, got {got}")


def init_block_params(n, width, hidden, norm="layer", *, generator, dtype=torch.float64,
                      device="cpu", prefix="blocks"):
    """n blocks' parameters: fc1, fc2 with nn.Linear's U(−1/√fan_in, 1/√fan_in) drawn in float64
    from ``generator`` (fc1 weight, fc1 bias, fc2 weight, fc2 bias, block by block), layer norm
    weight 1 and bias 0 (nn.LayerNorm)."""
    params = {}
    for i in range(n):
        if norm == "layer":
            params[f"{prefix}.{i}.norm.weight"] = torch.ones(width, dtype=dtype, device=device)
            params[f"{prefix}.{i}.norm.bias"] = torch.zeros(width, dtype=dtype, device=device)
        for name, (out_f, in_f) in (("fc1", (hidden, width)), ("fc2", (width, hidden))):
            bound = 1.0 / math.sqrt(in_f)
            for kind, shape in (("weight", (out_f, in_f)), ("bias", (out_f,))):
                t = torch.rand(shape, generator=generator, dtype=torch.float64)
                params[f"{prefix}.{i}.{name}.{kind}"] = t.mul_(2 * bound).sub_(bound).to(
                    dtype=dtype, device=device)
    return params



def block_forward(h, params, prefix, activation="relu", norm="layer", eps=1e-5, trace=None,
                  **act_options):
    """h (N, D) -> (h + fc2(act(fc1(LN(h)))) (N, D), cache).  prefix: e.g. "blocks.0".
    trace: a dict to record {prefix}.norm (u), .pre_activation (z), .activation (a), .branch (v)
    and .output in, or None."""
    u, norm_cache = h, None
    if norm == "layer":
        u, norm_cache = layernorm_forward(h, params[f"{prefix}.norm.weight"],
                                          params[f"{prefix}.norm.bias"], eps)
        record(trace, f"{prefix}.norm", u)
    z, fc1_cache = linear_forward(u, params[f"{prefix}.fc1.weight"], params[f"{prefix}.fc1.bias"])
    record(trace, f"{prefix}.pre_activation", z)
    a, act_cache = activation_forward(activation, z, **act_options)
    record(trace, f"{prefix}.activation", a)
    v, fc2_cache = linear_forward(a, params[f"{prefix}.fc2.weight"], params[f"{prefix}.fc2.bias"])
    record(trace, f"{prefix}.branch", v)
    out = h + v
    record(trace, f"{prefix}.output", out)
    return out, (prefix, activation, norm_cache, fc1_cache, act_cache, fc2_cache)


def block_backward(dout, cache, trace=None):
    """dout (N, D) -> dh (N, D), grads {name: tensor} of the block's parameters.  trace: a dict
    to record {prefix}.grad_output, .grad_activation, .grad_pre_activation, .grad_norm (at LN's
    output) and .grad_branch (the branch's gradient at h, before the residual sum) in, or None."""
    # out = h + f(h)  ⇒  dh = dout (the identity path) + ∂f/∂hᵀ·dout (the branch)
    prefix, activation, norm_cache, fc1_cache, act_cache, fc2_cache = cache
    grads = {}
    record(trace, f"{prefix}.grad_output", dout)
    da, grads[f"{prefix}.fc2.weight"], grads[f"{prefix}.fc2.bias"] = linear_backward(dout, fc2_cache)
    record(trace, f"{prefix}.grad_activation", da)
    dz = activation_backward(activation, da, act_cache)
    record(trace, f"{prefix}.grad_pre_activation", dz)
    du, grads[f"{prefix}.fc1.weight"], grads[f"{prefix}.fc1.bias"] = linear_backward(dz, fc1_cache)
    dh_branch = du
    if norm_cache is not None:
        record(trace, f"{prefix}.grad_norm", du)
        dh_branch, grads[f"{prefix}.norm.weight"], grads[f"{prefix}.norm.bias"] = \
            layernorm_backward(du, norm_cache)
    record(trace, f"{prefix}.grad_branch", dh_branch)
    # The residual's split and sum: the add passed dout unchanged to both h and v; the two
    # gradients reaching h are summed here, once.
    dh = dout + dh_branch
    return dh, grads


def blocks_forward(h, params, n, activation="relu", norm="layer", eps=1e-5, prefix="blocks",
                   trace=None, **act_options):
    """n blocks in sequence.  h (N, D) -> (h (N, D), caches).  trace: block_forward's."""
    caches = []
    for i in range(n):
        h, cache = block_forward(h, params, f"{prefix}.{i}", activation, norm, eps, trace,
                                 **act_options)
        caches.append(cache)
    return h, caches


def blocks_backward(dout, caches, trace=None):
    """dout (N, D) -> dh (N, D), grads of every block (last block first, as the forward reversed).
    trace: block_backward's."""
    grads = {}
    for cache in reversed(caches):
        dout, block_grads = block_backward(dout, cache, trace)
        grads.update(block_grads)
    return dout, grads
