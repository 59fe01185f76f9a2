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
from refnet.examples import register
from refnet.examples._common import clipped_run_checks
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
    return clipped_run_checks(train_step_spec(ctx.dtype_name, ctx.device), ctx.strict_bits)
