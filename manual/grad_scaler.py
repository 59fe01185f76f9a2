"""Loss scaling for float16 (and bfloat16) training, as torch.amp.GradScaler("cpu") does it.

A float16 gradient underflows to 0 below 6e-8 and overflows to inf above 65504.  Loss scaling
multiplies the loss by a large factor S before the backward pass (so small gradients stay
representable), divides it out of the float32 gradients before the optimizer, and adapts S:

    scale:    the backward pass starts from dloss = S instead of 1
    unscale:  found_inf = any gradient element non-finite;  g ← g · float32(1 / float64(S))
    step:     the optimizer runs only when found_inf is false (a skipped step changes nothing:
              no parameter, no momentum, no Adam step count)
    update:   overflow:  S ← float32(float64(S) · backoff),  tracker ← 0
              otherwise: tracker ← tracker + 1; at growth_interval S ← float32(float64(S) · growth)
                         when that is finite (S never grows to inf), tracker ← 0

Bits (torch/amp/grad_scaler.py and aten/src/ATen/native/cpu/AmpGradScalerKernels.cpp):
  - S is a float32 tensor: init_scale is rounded to float32 once.
  - The inverse is formed in double and rounded to float32 (``scale.double().reciprocal().float()``),
    and the gradients are *multiplied* by it (one rounding per element), skipped when it is
    exactly 1.  Dividing by S instead rounds differently whenever S is not a power of two.
  - The update multiplies the float32 S by the Python float factor in double, then rounds to
    float32: a float32 product would round twice.
"""
import math

import torch

from manual import _check


class GradScaler:
    """Dynamic loss scaling.  Settings as torch.amp.GradScaler names them (its defaults).

    Use per step:  dloss = scaler.scale_seed()  (the backward pass starts from it; k
    micro-batches: manual.step.micro_batch_seed), optionally ``scaler.unscale_(grads)`` to work
    on the true gradients (clipping), then ``scaler.step(optimizer, params, grads)`` (unscales
    grads in place unless unscale_ already did, steps unless a gradient was non-finite; returns
    whether it stepped), then ``scaler.update()``.
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000):
        self.init_scale, self.growth_factor, self.backoff_factor, self.growth_interval = \
            check_scaler_settings(init_scale, growth_factor, backoff_factor, growth_interval)
        self.scale = torch.full((), self.init_scale, dtype=torch.float32)   # S, float32
        self.growth_tracker = 0          # consecutive steps without overflow
        self.found_inf = None            # this step's overflow flag, set by unscale_

    def scale_seed(self, device="cpu"):
        """dloss for the backward pass: d(S·loss)/d loss = S, as a float32 scalar."""
        return self.scale.to(device).clone()

    def inverse_scale(self):
        """float32(1 / float64(S)): the factor unscale_ multiplies by."""
        return self.scale.double().reciprocal().float()

    def unscale_(self, grads):
        """grads: name -> float32 tensor, unscaled in place.  Sets and returns found_inf (bool).
        Once per step (torch raises on a second call before update: the grads would be divided
        twice)."""
        if self.found_inf is not None:
            raise ValueError("unscale_: already called since the last update (once per step)")
        inv = self.inverse_scale()
        found_inf = False
        for g in grads.values():
            found_inf = found_inf or not bool(torch.isfinite(g).all())
            if float(inv) != 1.0:                    # the kernel leaves g as is when inv == 1
                g.mul_(inv.to(g.device))
        self.found_inf = found_inf
        return found_inf

    def step(self, optimizer, params, grads):
        """Unscale grads (unless unscale_ ran this step: then grads are the unscaled, perhaps
        clipped, ones), then ``optimizer.step(params, grads)`` unless a gradient was non-finite
        when unscaled — the flag of unscale_, whatever clipping did since (as torch: the inf
        check is recorded at unscale time).  Returns True when the optimizer stepped."""
        found_inf = self.unscale_(grads) if self.found_inf is None else self.found_inf
        if found_inf:
            return False
        optimizer.step(params, grads)
        return True

    def update(self):
        """Back off after an overflow, grow after growth_interval clean steps (module docstring)."""
        if self.found_inf is None:
            raise ValueError("update: no step since the last update (call step first)")
        s = float(self.scale)                                      # exact: float32 ⊂ double
        if self.found_inf:
            self.scale.fill_(s * self.backoff_factor)              # double product, one rounding
            self.growth_tracker = 0
        else:
            successful = self.growth_tracker + 1
            if successful == self.growth_interval:
                grown = torch.tensor(s * self.growth_factor, dtype=torch.float64).float()
                if bool(torch.isfinite(grown)):                    # never grow to inf
                    self.scale.copy_(grown)
                self.growth_tracker = 0
            else:
                self.growth_tracker = successful
        self.found_inf = None

    def state_dict(self):
        """The keys of torch.amp.GradScaler.state_dict(), so a checkpoint moves between the two."""
        return {"scale": float(self.scale), "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": self.growth_tracker}

    def load_state_dict(self, state):
        """Restore from state_dict() (ours or torch.amp.GradScaler's): scale, tracker, settings."""
        missing = {"scale", "growth_factor", "backoff_factor", "growth_interval",
                   "_growth_tracker"} - set(state)
        if missing:
            raise ValueError(f"state: missing {sorted(missing)}")
        _, self.growth_factor, self.backoff_factor, self.growth_interval = check_scaler_settings(
            1.0, state["growth_factor"], state["backoff_factor"], state["growth_interval"])
        self.scale.fill_(state["scale"])
        self.growth_tracker = int(state["_growth_tracker"])


def check_scaler_settings(init_scale, growth_factor, backoff_factor, growth_interval):
    """The four settings, validated: init_scale finite > 0, growth_factor > 1,
    0 < backoff_factor < 1, growth_interval an integer >= 1.  ValueError naming the setting."""
    init_scale = _check.number("grad_scaler.init_scale", init_scale, allow_equal=False)
    if not math.isfinite(float(torch.tensor(init_scale, dtype=torch.float32))):
        raise ValueError(f"grad_scaler.init_scale: expected a positive number that is finite in "
                         f"float32, got {init_scale!r}")
    growth_factor = _check.number("grad_scaler.growth_factor", growth_factor, low=1.0,
                                  allow_equal=False)
    backoff_factor = _check.number("grad_scaler.backoff_factor", backoff_factor,
                                   allow_equal=False, high=1.0)
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) \
            or growth_interval < 1:
        raise ValueError(f"grad_scaler.growth_interval: expected an integer >= 1, got "
                         f"{growth_interval!r}")
    return float(init_scale), float(growth_factor), float(backoff_factor), growth_interval
