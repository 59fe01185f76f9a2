"""The step a training script runs (issue 24), through the training loop: the spiral classifier
with AdamW, a linear warm-up then cosine learning-rate schedule, global-norm gradient clipping at
a norm that clips in the early steps, and 2 micro-batches accumulated per optimizer step.

Manual side: manual/step.py's micro-batch seed and AccumulateGrad order, manual/clip.py,
manual/schedules.py; twin: ``(loss / 2).backward()`` twice, clip_grad_norm_, torch's
SequentialLR(LinearLR, CosineAnnealingLR).  Checked bitwise: the gradients at init, the loss
curve, every step's learning rate and total gradient norm, the final parameters.  The report
says on how many steps the clipping was active.  (``ffn_stack`` is the same step over residual
FFN blocks.)
"""
from refnet.data import load_data
from refnet.examples import register
from refnet.examples._common import claim_check
from refnet.harness import twin_checks
from refnet.spec import Spec

SIZES, N_SAMPLES, BATCH, ACCUMULATE, STEPS = [2, 24, 24, 3], 150, 25, 2, 40
CLIP = {"max_norm": 2.0, "norm_type": 2}
SCHEDULE = {"name": "warmup_cosine", "warmup_steps": 5, "min_lr": 1e-4}


def train_step_spec(dtype="float64", device="cpu"):
    return Spec(sizes=SIZES, activation="tanh", loss="cross_entropy", data="spiral",
                n_samples=N_SAMPLES, batch_size=BATCH, accumulate=ACCUMULATE, steps=STEPS,
                optimizer={"name": "adamw", "lr": 0.02}, clip_grad_norm=CLIP,
                lr_schedule=SCHEDULE, init="randn", dtype=dtype, device=device, seed=3,
                name="train_step")   # randn: large early gradients, which the clip bounds


@register("train_step", "spiral, AdamW, warm-up + cosine, clipping active early, 2 micro-batches "
          "per step", "issue 24", spec=train_step_spec)
def run_train_step(ctx):
    spec = train_step_spec(ctx.dtype_name, ctx.device)
    x, target = load_data(spec)
    outs = []
    checks = twin_checks(spec, x, target, ctx.strict_bits, record=outs)
    clipped = [step for step, out in enumerate(outs) if out.clipped]
    late = [step for step in clipped if step >= len(outs) // 2]
    checks.append(claim_check(
        "clipping_active_early", bool(clipped) and clipped[0] == 0 and not late,
        f"the clip (max_norm {CLIP['max_norm']}) scaled the gradients on {len(clipped)} of "
        f"{len(outs)} steps ({', '.join(map(str, clipped))}): from step 0, none in the second "
        f"half (both sides' total norms are compared in the loss_curve check)",
        {"clipped_steps": len(clipped), "steps": len(outs), "clipped_late": len(late)}))
    return checks
