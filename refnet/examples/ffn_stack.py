"""Issue 24's ``ffn_stack``: the training step of ``train_step`` over a small transformer-style
MLP — a linear input projection to width D, 2 residual FFN blocks
h ← h + fc2(GELU(fc1(LN(h)))), then the head — trained on spiral with AdamW, a linear warm-up
then cosine learning-rate schedule, global-norm gradient clipping at a norm that clips in the
early steps, and 2 micro-batches accumulated per optimizer step.

Manual side: manual.MLP with blocks (manual/blocks.py: the residual's gradient split and sum),
manual/step.py, manual/clip.py, manual/schedules.py; twin: refnet.twin.Twin with FFNBlock
(nn.LayerNorm, nn.Linear, nn.GELU, the residual add in forward), ``(loss / 2).backward()`` twice,
clip_grad_norm_, SequentialLR(LinearLR, CosineAnnealingLR).  Checked bitwise: the gradients at
init of every parameter (the blocks' norm, fc1, fc2 included), the loss curve, every step's
learning rate and total gradient norm, the final parameters.  The report says on how many steps
the clipping was active.
"""
from refnet.examples import register
from refnet.examples._common import clipped_run_checks
from refnet.spec import Spec

WIDTH, HIDDEN, N_BLOCKS = 16, 32, 2
SIZES, N_SAMPLES, BATCH, ACCUMULATE, STEPS = [2, WIDTH, 3], 150, 25, 2, 40
BLOCKS = {"n": N_BLOCKS, "width": WIDTH, "hidden": HIDDEN, "norm": "layer", "activation": "gelu"}
CLIP = {"max_norm": 3.0, "norm_type": 2}
SCHEDULE = {"name": "warmup_cosine", "warmup_steps": 5, "min_lr": 1e-4}


def ffn_stack_spec(dtype="float64", device="cpu"):
    return Spec(sizes=SIZES, activation="identity", blocks=BLOCKS, loss="cross_entropy",
                data="spiral", n_samples=N_SAMPLES, batch_size=BATCH, accumulate=ACCUMULATE,
                steps=STEPS, optimizer={"name": "adamw", "lr": 0.02}, clip_grad_norm=CLIP,
                lr_schedule=SCHEDULE, init="randn", dtype=dtype, device=device, seed=5,
                name="ffn_stack")   # randn projection and head: large early gradients, clipped


@register("ffn_stack", "input projection, 2 residual FFN blocks (pre-LayerNorm, GELU), head; "
          "spiral, AdamW, warm-up + cosine, clipping active early, 2 micro-batches per step",
          "issue 24", spec=ffn_stack_spec)
def run_ffn_stack(ctx):
    return clipped_run_checks(ffn_stack_spec(ctx.dtype_name, ctx.device), ctx.strict_bits)
