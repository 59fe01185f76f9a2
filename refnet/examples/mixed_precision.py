"""Mixed precision as people train (issue 23), through the training loop: float32 master weights,
the GEMMs and activations in bfloat16 / float16 under ``torch.autocast("cpu", dtype)``, the loss
in float32 (manual/autocast.py), and for float16 a GradScaler (manual/grad_scaler.py vs
torch.amp.GradScaler).  Checked bitwise on CPU: the gradients of one autocast step at init, the
loss curve (with, under the scaler, every step's loss scale and whether it was skipped) and the
final parameters.  Autocast examples run in float32 only (autocast casts float32 tensors).  On
CUDA (other autocast lists, other kernels) they run at the tolerance tier with L's bounds
(refnet/not_bitwise.py, "autocast:*"; training unbounded, graded and reported).
"""
from manual.autocast import AUTOCAST_BACKWARD
from refnet.compare import Check
from refnet.data import load_data
from refnet.examples import register
from refnet.examples._common import claim_check
from refnet.harness import twin_checks
from refnet.spec import Spec

STEPS = 40
SCALER = {"init_scale": 2.0 ** 30, "growth_interval": 4}   # the first scale overflows float16


def spiral_bf16_spec(dtype="float32", device="cpu"):
    return Spec(sizes=[2, 100, 3], activation="relu", loss="cross_entropy", reg=1e-3,
                data="spiral", n_samples=150, batch_size=50, dtype=dtype, device=device,
                autocast="bfloat16", optimizer={"name": "adamw", "lr": 1e-2}, steps=STEPS,
                name="spiral_bf16")


def circles_fp16_spec(dtype="float32", device="cpu"):
    return Spec(sizes=[2, 16, 16, 2], activation="tanh", loss="cross_entropy", data="circles",
                n_samples=100, batch_size=50, dtype=dtype, device=device, autocast="float16",
                grad_scaler=SCALER, optimizer={"name": "adam", "lr": 1e-2}, steps=STEPS,
                name="circles_fp16_scaler")


@register("spiral_bf16", "the spiral classifier under bf16 autocast, AdamW", "issue 23",
          spec=spiral_bf16_spec, dtypes=("float32",), devices=("cpu", "cuda"))
def run_spiral_bf16(ctx):
    spec = spiral_bf16_spec(ctx.dtype_name, ctx.device)
    x, target = load_data(spec)
    return twin_checks(spec, x, target, ctx.strict_bits)


@register("circles_fp16_scaler", "circles under fp16 autocast with a GradScaler whose first scale "
          "overflows", "issue 23", spec=circles_fp16_spec, dtypes=("float32",), devices=("cpu", "cuda"))
def run_circles_fp16_scaler(ctx):
    spec = circles_fp16_spec(ctx.dtype_name, ctx.device)
    x, target = load_data(spec)
    outs = []
    checks = twin_checks(spec, x, target, ctx.strict_bits, record=outs)
    skipped_m = [s for s, o in enumerate(outs) if not o.stepped_m]
    skipped_t = [s for s, o in enumerate(outs) if not o.stepped_t]
    history = [(s, o.scale_m) for s, o in enumerate(outs) if s == 0 or o.scale_m != outs[s - 1].scale_m]
    checks.append(claim_check(
        "scaler_skips", bool(skipped_m) and skipped_m[0] == 0 and skipped_m == skipped_t,
        f"skipped steps manual {skipped_m}, twin {skipped_t} (the same); scale history "
        + ", ".join(f"step {s}: {v:g}" for s, v in history),
        {"skipped_steps": len(skipped_m), "steps": len(outs), "final_scale": outs[-1].scale_m}))
    return checks


# every activation mirrored under autocast, each dtype: the low-precision backward rules of
# manual/autocast.py (AUTOCAST_BACKWARD) in the main job.  float16 with a GradScaler whose scale
# grows by 1.5 (not a power of two: an unscale by division would round differently)
GRID_SCALER = {"init_scale": 2.0 ** 16, "growth_factor": 1.5, "growth_interval": 2}
GRID_STEPS = 10


def activation_grid_spec(activation, autocast, device="cpu", norm=None):
    return Spec(sizes=[2, 16, 16, 3], activation=activation, loss="cross_entropy", data="spiral",
                n_samples=90, batch_size=30, dtype="float32", device=device, autocast=autocast,
                norm=norm,
                grad_scaler=GRID_SCALER if autocast == "float16" else None,
                optimizer={"name": "adam", "lr": 1e-2}, steps=GRID_STEPS,
                name=f"autocast_{activation}_{autocast}" + (f"_{norm}" if norm else ""))


@register("autocast_activations", "every activation mirrored under autocast, tanh after a layer "
          "norm, ReLU after a batch norm (bf16; fp16 with a GradScaler growing by 1.5): gradients "
          "at init, curve and final parameters",
          "issue 23", dtypes=("float32",), devices=("cpu", "cuda"))
def run_autocast_activations(ctx):
    """One row per activation and autocast dtype (and a layer norm and a batch norm row per
    dtype): the three checks of twin_checks in one."""
    checks = []
    for autocast in ("bfloat16", "float16"):
        rows = [(act, None) for act in sorted(AUTOCAST_BACKWARD)] + [("tanh", "layernorm"),
                                                                     ("relu", "batchnorm")]
        for act, norm in rows:
            spec = activation_grid_spec(act, autocast, ctx.device, norm)
            x, target = load_data(spec)
            parts = twin_checks(spec, x, target, ctx.strict_bits)
            checks.append(Check(f"{autocast}.{norm or act}", [v for c in parts for v in c.verdicts],
                                note=parts[0].note, expected=parts[-1].expected))
    return checks
