"""The specs `refnet verify --nproc N` checks without --spec (small enough for CI).

The document's net (smaller), a deep ReLU net with biases, a cross-entropy + Adam net; and
bn_dp_spec, batch norm and dropout data-parallel (refnet.dp_pair.DPPair.sync_buffers mirrors
DDP's broadcast of rank 0's buffers; each rank draws its own dropout stream).
"""
from refnet.spec import Spec


def dp_specs(dtype="float64", device="cpu", steps=6):
    return [
        Spec(sizes=[64, 100, 10], activation="sigmoid", bias=False, loss="sum_squared",
             init="randn", data="random", n_samples=24, optimizer={"name": "sgd", "lr": 1e-4},
             steps=steps, dtype=dtype, device=device, name="dp_document_net"),
        Spec(sizes=[8, 32, 32, 32, 4], activation="relu", loss="mse", data="random", n_samples=48,
             batch_size=24, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}, steps=steps,
             dtype=dtype, device=device, name="dp_deep_relu"),
        Spec(sizes=[2, 32, 3], activation="tanh", loss="cross_entropy", data="spiral",
             n_samples=60, batch_size=12, optimizer={"name": "adam", "lr": 0.01}, steps=steps,
             dtype=dtype, device=device, name="dp_ce_adam"),
    ]


def bn_dp_spec(dtype="float64", device="cpu", steps=6):
    """Batch norm (per-rank statistics, rank 0's running statistics broadcast each step) and,
    on the CPU, dropout (each rank's own stream), data-parallel."""
    return Spec(sizes=[2, 16, 16, 3], activation="relu", loss="cross_entropy", data="spiral",
                n_samples=48, batch_size=24, norm="batchnorm", dropout=0.2 if device == "cpu" else 0.0,
                optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, steps=steps, dtype=dtype,
                device=device, name="dp_batchnorm_dropout")


def step_key_dp_specs(dtype="float64", device="cpu", steps=4):
    """The training-step keys data-parallel (docs/data-parallel.md, "The training step's keys"):
    each of clip_grad_norm, lr_schedule and accumulate alone, then the three together.  Tiny
    nets: every spec runs in a few seconds per world size."""
    base = dict(sizes=[2, 16, 3], activation="tanh", loss="cross_entropy", data="spiral",
                n_samples=48, batch_size=12, optimizer={"name": "adamw", "lr": 0.05},
                steps=steps, dtype=dtype, device=device)
    clip = {"max_norm": 0.6}     # every clip spec clips on some of its 4 steps and not on others
    schedule = {"name": "warmup_cosine", "warmup_steps": 2, "min_lr": 1e-3}
    return [Spec(**base, clip_grad_norm=clip, name="dp_clip"),
            Spec(**base, clip_grad_norm={"max_norm": 0.245, "norm_type": "inf"}, name="dp_clip_inf"),
            Spec(**base, lr_schedule=schedule, name="dp_warmup_cosine"),
            Spec(**base, accumulate=2, name="dp_accumulate2"),
            Spec(**{**base, "n_samples": 72}, accumulate=3, name="dp_accumulate3"),
            Spec(**base, clip_grad_norm={"max_norm": 0.3}, accumulate=2, lr_schedule=schedule,
                 name="dp_clip_accumulate_schedule")]


def autocast_dp_specs(device="cpu", steps=4):
    """bf16 autocast data-parallel (issue 23): the forward and loss under torch.autocast on the
    DDP side, float32 gradients reduced in float32; and fp16 with a GradScaler that grows every
    2 clean steps until a step overflows and is skipped (step 4 of 6 at N = 1, 2, 3; the inf
    check runs on every rank after the all-reduce)."""
    base = dict(sizes=[2, 16, 16, 3], activation="relu", loss="cross_entropy", data="spiral",
                n_samples=48, batch_size=24, optimizer={"name": "adamw", "lr": 0.02},
                steps=steps, dtype="float32", device=device)
    return [Spec(**base, autocast="bfloat16", name="dp_bf16"),
            Spec(**{**base, "activation": "tanh", "steps": steps + 2}, autocast="float16",
                 grad_scaler={"init_scale": 2.0 ** 17, "growth_interval": 2},
                 name="dp_fp16_scaler")]


def embedding_dp_specs(device="cpu", steps=4):
    """An embedding net data-parallel, float32, float64 and bf16 autocast: DDP's first bucket
    holds embed.weight first (the twin registers it first; the manual dict keeps it last), and
    its gradient is ready last."""
    base = dict(sizes=[8, 16, 27], activation="tanh", loss="cross_entropy", data="names",
                n_samples=48, batch_size=24, embedding={"vocab": 27, "dim": 4, "context": 2},
                optimizer={"name": "adam", "lr": 0.01}, steps=steps, device=device)
    return [Spec(**base, dtype="float32", name="dp_embedding"),
            Spec(**base, dtype="float64", name="dp_embedding"),
            Spec(**base, dtype="float32", autocast="bfloat16", name="dp_embedding_bf16")]
