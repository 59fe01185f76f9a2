"""Global-norm gradient clipping, written out: torch.nn.utils.clip_grad_norm_'s arithmetic.

    per-tensor norms   nᵢ = ‖gᵢ‖            (2: √Σ g², inf: max |g|)
    total norm         N  = ‖(n₁, …, n_P)‖  the same norm over the P norms: a norm of norms
    coefficient        c  = max_norm / (N + 1e-6)
    clamp              c  ← min(c, 1)        (never amplifies; always applied, as torch does)
    scaling            gᵢ ← gᵢ · c

clip_grad_norm_ (torch 2.13, CPU) takes its foreach path: ``torch._foreach_norm`` (on CPU one
``linalg.vector_norm`` per gradient), ``torch.stack`` of the norms and one more ``vector_norm``
of that vector, then ``_foreach_mul_`` by the clamped coefficient (on CPU ``g.mul_(c)`` each).
What decides the last bits, and how each is mirrored here:

* ``max_norm / (N + 1e-6)`` is Python's ``float / Tensor``, i.e. ``Tensor.__rtruediv__``, which
  torch defines as ``reciprocal(N + 1e-6) * max_norm``: two roundings, not one division.
* The 2-norm's sum of squares runs in the CPU kernel's vector lanes (norm_kernel_cpu's
  ``is_reduce_lastdim`` fast path, ReduceOpsKernel.cpp): ``_sum_of_squares`` below.
* Its square root is ``std::sqrt`` (correctly rounded).  ``torch.sqrt`` is not always: on this
  MKL build it is 1 ulp off for some float32 inputs, so the root is taken with ``math.sqrt`` on
  the exact float64 value (float32: a correctly rounded double square root rounded to float32 is
  the correctly rounded float32 root, since 53 ≥ 2·24 + 2).
* The inf-norm is a max of |g|: exact, order free (NaN propagates, as AbsMaxOps).

The norms are stacked in the order of ``grads``: pass them in the twin's ``parameters()`` order
(the order matters for the total 2-norm once P ≥ 2 terms round).

Shapes: each gradient any shape; the norms are 0-d tensors of the gradients' dtype.
"""
import math

import torch

from manual.kernel_exp import VECTOR_BITS

NORM_TYPES = (2.0, math.inf)


def check_norm_type(norm_type):
    """2 (or 2.0) or inf ("inf", math.inf) -> 2.0 / math.inf; anything else a ValueError."""
    if norm_type in ("inf", math.inf):
        return math.inf
    if not isinstance(norm_type, bool) and norm_type in (2, 2.0):
        return 2.0
    raise ValueError(f"norm_type: expected 2 or 'inf', got {norm_type!r}")


def clip_settings(config):
    """A spec's ``clip_grad_norm`` object -> {"max_norm": float > 0, "norm_type": 2 or "inf"}."""
    if not isinstance(config, dict) or "max_norm" not in config:
        raise ValueError(f"clip_grad_norm: expected an object with 'max_norm', got {config!r}")
    unknown = sorted(set(config) - {"max_norm", "norm_type"})
    if unknown:
        raise ValueError(f"clip_grad_norm.{unknown[0]}: unknown setting; expected max_norm, norm_type")
    max_norm = config["max_norm"]
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) \
            or not math.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"clip_grad_norm.max_norm: expected a finite number > 0, got {max_norm!r}")
    try:
        norm_type = check_norm_type(config.get("norm_type", 2))
    except ValueError:
        raise ValueError(f"clip_grad_norm.norm_type: expected 2 or \"inf\", got "
                         f"{config.get('norm_type')!r}") from None
    return {"max_norm": float(max_norm), "norm_type": "inf" if norm_type == math.inf else 2}


def _lanes(dtype, device):
    """(lanes, tail_plain): Vectorized<T>::size() of the build, and how many leading elements of the
    scalar tail the compiler evaluates as a separate (uncontracted) vector multiply.  Measured on
    AVX2 (torch 2.13): float32 8 lanes, tail 4 (an SSE epilogue takes the first 4 tail squares when
    the tail has ≥ 4; the rest are one FMA each); float64 4 lanes, every tail square an FMA.  Other
    capabilities: the same rule at their vector width, not measured.  (0, 0) off the CPU."""
    if device.type != "cpu":
        return 0, 0
    bits = VECTOR_BITS.get(torch.backends.cpu.get_cpu_capability(), 256)
    lanes = bits // torch.finfo(dtype).bits
    return lanes, (4 if dtype == torch.float32 else 0)


def _sum_of_squares(g):
    """Σ g² of a gradient in norm_kernel_cpu's order, as a 0-d tensor of g's dtype.

    Row-major order of g (AccumulateGrad keeps .grad in the parameter's layout).  A lanes-wide
    accumulator adds each full chunk's squares (acc + g·g: product and sum rounded separately),
    its lanes are folded left to right (buffer[0] + buffer[j]), then the tail is added element by
    element: buffer[0] + g·g, contracted into one FMA, except the leading ``tail_plain`` squares
    of a tail at least that long (``_lanes``).  Off the CPU: a plain ``(g·g).sum()``.
    """
    flat = g.reshape(-1)
    lanes, tail_plain = _lanes(flat.dtype, flat.device)
    if lanes == 0:
        return (flat * flat).sum()
    n = flat.numel()
    body = n - n % lanes
    acc = torch.zeros(lanes, dtype=flat.dtype, device=flat.device)
    squares = flat[:body].view(-1, lanes) * flat[:body].view(-1, lanes)
    for chunk in squares:
        acc = acc + chunk
    total = acc[0]
    for j in range(1, lanes):
        total = total + acc[j]
    tail = flat[body:]
    plain = tail_plain if tail.numel() >= tail_plain else 0
    for j, v in enumerate(tail):
        total = total + v * v if j < plain else torch.addcmul(total, v, v)
    return total


def _sqrt(t):
    """√t correctly rounded (std::sqrt), for a 0-d tensor: math.sqrt of its exact float64 value."""
    value = t.item()
    root = math.sqrt(value) if value >= 0 else math.nan
    return torch.tensor(root, dtype=t.dtype, device=t.device)


def tensor_norm(g, norm_type=2.0):
    """‖g‖ over all elements, as torch.linalg.vector_norm(g, norm_type) on the CPU."""
    norm_type = check_norm_type(norm_type)
    if norm_type == math.inf:
        return g.abs().max() if g.numel() else torch.zeros((), dtype=g.dtype, device=g.device)
    return _sqrt(_sum_of_squares(g)) if g.device.type == "cpu" else _sum_of_squares(g).sqrt()


def total_norm(grads, norm_type=2.0):
    """The norm of the per-tensor norms, in the order of grads (a dict name -> tensor or a list).

    -> (total (0-d), norms: list of the per-tensor 0-d norms)."""
    tensors = list(grads.values()) if isinstance(grads, dict) else list(grads)
    norms = [tensor_norm(g, norm_type) for g in tensors]
    return tensor_norm(torch.stack(norms), norm_type), norms


def clip_coefficient(total, max_norm):
    """min(max_norm / (total + 1e-6), 1) with torch's roundings: reciprocal, then times max_norm."""
    coef = (total + 1e-6).reciprocal() * float(max_norm)   # float / Tensor is Tensor.__rtruediv__
    return torch.clamp(coef, max=1.0)


def clip_grad_norm(grads, max_norm, norm_type=2.0):
    """Scale every gradient by the clamped coefficient, as clip_grad_norm_ does in place.

    grads: dict name -> tensor, in the twin's parameter order.  max_norm > 0.
    -> (clipped grads (a new dict, same order), total norm (0-d), coefficient (0-d)).
    Where max_norm / (total + 1e-6) ≥ 1 the clamped coefficient is 1 and the gradients keep
    their bits (g·1 = g); a step is "clipped" when the coefficient is < 1.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) \
            or not math.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"max_norm: expected a finite number > 0, got {max_norm!r}")
    total, _ = total_norm(grads, norm_type)
    coef = clip_coefficient(total, max_norm)
    clipped = {name: g * coef for name, g in grads.items()}
    return clipped, total, coef
