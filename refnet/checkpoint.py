"""The training checkpoint format: save, load and validate (`refnet train --resume`).

A checkpoint file is a header line `REFNET-CHECKPOINT <format> <sha256 of the body>` followed by
torch.save's bytes of a dict holding both sides' parameters, both optimizers' state, the losses
so far, the step reached, the spec, the example name, batch norm's running statistics, both
sides' dropout streams (data parallel: every rank's), both sides' LR schedule and GradScaler state, the per-step
learning rates and clip norms so far, and the number of processes.  The batch
schedule is not stored: it is regenerated from the spec's seed, so on CPU a resumed run's curve
is bitwise the uninterrupted one.  Written atomically (refnet.atomic); a flipped or truncated file fails the checksum.
"""
import hashlib
import io
import os

import torch

from refnet import twin as twin_mod
from refnet.atomic import write_atomic

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_MAGIC = b"REFNET-CHECKPOINT"
CHECKPOINT_FORMAT = 1
RUN_FILES = (CHECKPOINT_NAME, "losses.csv", "summary.json")
_CHECKPOINT_KEYS = ("step", "spec", "example", "manual_params", "twin_params", "manual_optimizer",
                    "twin_optimizer", "losses_manual", "losses_twin")


def existing_run_files(out_dir):
    """The files of an earlier run already in out_dir (checkpoint.pt, losses.csv, summary.json)."""
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]


def save_checkpoint(path, payload):
    """A header line `REFNET-CHECKPOINT <format> <sha256 of the body>` then torch.save's bytes."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = b"%s %d %s\n" % (CHECKPOINT_MAGIC, CHECKPOINT_FORMAT,
                              hashlib.sha256(body).hexdigest().encode())
    write_atomic(path, lambda f: (f.write(header), f.write(body)))


def load_checkpoint(path, map_location="cpu"):
    """Read and verify a checkpoint; ValueError (one line) if it is missing, foreign or corrupt."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"--resume: no checkpoint at {path}")
    with open(path, "rb") as f:
        raw = f.read()
    head, sep, body = raw.partition(b"\n")
    fields = head.split(b" ")
    if not sep or len(fields) != 3 or fields[0] != CHECKPOINT_MAGIC:
        raise ValueError(f"--resume: {path} is not a refnet checkpoint (bad header)")
    if fields[1] != str(CHECKPOINT_FORMAT).encode():
        raise ValueError(f"--resume: {path} has checkpoint format {fields[1].decode(errors='replace')}; "
                         f"this refnet reads format {CHECKPOINT_FORMAT}")
    if hashlib.sha256(body).hexdigest().encode() != fields[2]:
        raise ValueError(f"--resume: {path} is corrupt or truncated (sha256 of its contents does "
                         f"not match the one recorded in it); refusing to resume from it")
    try:
        payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as exc:  # a checksum-valid file torch cannot read: a foreign writer
        raise ValueError(f"--resume: {path} cannot be loaded ({exc.__class__.__name__})") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ValueError(f"--resume: {path} lacks {missing}; not a refnet training checkpoint")
    return payload


STATE_KEYS = ("manual_params", "twin_params", "manual_buffers", "twin_buffers", "manual_optimizer",
              "twin_optimizer", "manual_rng", "twin_rng", "rank_streams", "losses_manual",
              "losses_twin", "step", "world_size", "manual_schedule", "twin_schedule",
              "manual_scaler", "twin_scaler", "step_columns")


def state_differences(a, b):
    """The pieces of training state in which two checkpoints differ (bitwise for tensors), as
    names like "manual_optimizer.buffers.layers.0.weight"; [] when they hold the same state."""
    out = []

    def walk(name, x, y):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            same = (x.dtype == y.dtype and x.shape == y.shape
                    and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)))
        elif isinstance(x, dict) and isinstance(y, dict) and x.keys() == y.keys():
            return [walk(f"{name}.{k}", x[k], y[k]) for k in x]
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and len(x) == len(y):
            return [walk(f"{name}[{i}]", u, v) for i, (u, v) in enumerate(zip(x, y))]
        else:
            same = type(x) is type(y) and x == y
        if not same:
            out.append(name)

    for key in STATE_KEYS:
        walk(key, a.get(key), b.get(key))
    return out


def cpu_copy(obj):
    """Detached CPU copies of every tensor in nested dicts/lists (what a checkpoint stores)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def to_device(obj, device):
    """Every tensor in nested dicts/lists moved to device (a checkpoint's state, restored)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def check_resume_spec(spec, saved):
    """Only steps (to extend a run; not with an lr_schedule, which spans the run) and device may
    differ from the checkpoint's spec."""
    now = spec.to_dict()
    if saved.get("lr_schedule") is not None and now["steps"] != saved["steps"]:
        raise ValueError(f"--steps: the lr_schedule spans the run's {saved['steps']} steps; a "
                         f"scheduled run resumes with the same steps, not {now['steps']}")
    for key, value in saved.items():
        if key in ("steps", "device"):
            continue
        if now.get(key) != value:
            raise ValueError(f"--resume: {key} is {now.get(key)!r} but the checkpoint was trained "
                             f"with {value!r}; a resumed run must keep it")


def check_world_size(ck, world_size):
    """A checkpoint resumes on the number of processes it was trained on (older and
    single-process checkpoints: 1)."""
    saved = ck.get("world_size") or 1
    if saved != world_size:
        raise ValueError(f"--nproc: the checkpoint was trained on {saved} processes; resume it "
                         f"with --nproc {saved}, not {world_size}")


def check_resume(ck, spec, world_size=1):
    """Everything that must hold before a run resumes from checkpoint ck: the spec (but steps and
    device) unchanged, the same number of processes, and steps still to train."""
    check_resume_spec(spec, ck["spec"])
    check_world_size(ck, world_size)
    if ck["step"] >= spec.steps:
        raise ValueError(f"--steps: the checkpoint is already at step {ck['step']}; give --steps "
                         f"larger than that to continue")


def save_run(path, pair, spec, example, state, world_size=1, rank_streams=None):
    """A checkpoint of a lockstep run (refnet.harness.Pair) at state.step (refnet.train.RunState:
    its loss history and worst tier).  rank_streams: every rank's dropout streams, in rank order
    (data parallel: refnet.dp_pair.DPPair.gather_streams); the top-level streams are this
    process's (rank 0's)."""
    losses_m, losses_t = state.history()
    save_checkpoint(path, {
        "format": CHECKPOINT_FORMAT, "step": state.step, "spec": spec.to_dict(),
        "example": example, "world_size": world_size,
        "manual_params": cpu_copy(pair.mlp.params),
        "twin_params": cpu_copy(twin_mod.params_of(pair.twin)),
        "manual_buffers": cpu_copy(pair.mlp.buffers),
        "twin_buffers": cpu_copy(twin_mod.buffers_of(pair.twin)),
        **_streams(pair),
        "rank_streams": rank_streams,
        "manual_optimizer": cpu_copy(pair.mlp.optimizer.state_dict()),
        "twin_optimizer": cpu_copy(pair.twin_opt.state_dict()),
        "losses_manual": losses_m.cpu(), "losses_twin": losses_t.cpu(),
        **_schedules(pair), **_scalers(pair), "step_columns": state.step_columns(),
        "worst_tier": state.worst, "torch": str(torch.__version__),
    })


def _schedules(pair):
    """Both sides' LR schedule state (manual.schedules' state_dict, the torch scheduler's), or
    None without a schedule."""
    if pair.schedule is None:
        return {"manual_schedule": None, "twin_schedule": None}
    return {"manual_schedule": pair.schedule.state_dict(),
            "twin_schedule": pair.twin_sched.state_dict()}


def _scalers(pair):
    """Both sides' GradScaler state (scale, growth tracker, settings), or None without one."""
    if pair.scaler is None:
        return {"manual_scaler": None, "twin_scaler": None}
    return {"manual_scaler": pair.scaler.state_dict(), "twin_scaler": pair.twin_scaler.state_dict()}


def _streams(pair):
    """Both sides' dropout streams (the twin has none without dropout)."""
    gen = pair.mlp.generator
    return {"manual_rng": gen.get_state() if gen is not None else None,
            "twin_rng": getattr(pair.twin, "_rng_state", None)}


def restore_run(pair, ck, device, rank=0):
    """Both sides' parameters, both optimizers' state, the LR schedules, batch norm's running
    statistics and the dropout streams (rank's own, when the checkpoint keeps every rank's) from a checkpoint."""
    names = set(pair.mlp.params)
    for side in ("manual_params", "twin_params"):
        if set(ck[side]) != names:
            raise ValueError(f"--resume: checkpoint {side} are {sorted(ck[side])}, the spec's "
                             f"model has {sorted(names)}")
    for name, p in pair.mlp.params.items():
        p.copy_(ck["manual_params"][name])
    twin_mod.load_params(pair.twin, ck["twin_params"])
    pair.mlp.optimizer.load_state_dict(to_device(ck["manual_optimizer"], device))
    pair.twin_opt.load_state_dict(ck["twin_optimizer"])
    if (ck.get("manual_schedule") is None) != (pair.schedule is None):
        raise ValueError("--resume: the checkpoint and the spec disagree on lr_schedule")
    if pair.schedule is not None:   # after the optimizer: its param_groups hold lr, initial_lr
        pair.schedule.load_state_dict(ck["manual_schedule"])
        pair.twin_sched.load_state_dict(ck["twin_schedule"])
    if (ck.get("manual_scaler") is None) != (pair.scaler is None):
        raise ValueError("--resume: the checkpoint and the spec disagree on grad_scaler")
    if pair.scaler is not None:
        pair.scaler.load_state_dict(ck["manual_scaler"])
        pair.twin_scaler.load_state_dict(ck["twin_scaler"])
    # batch norm's running statistics and the dropout streams (absent in older checkpoints,
    # whose specs have neither)
    buffers = ck.get("manual_buffers", {})
    if set(buffers) != set(pair.mlp.buffers):
        raise ValueError(f"--resume: checkpoint buffers are {sorted(buffers)}, the spec's model "
                         f"has {sorted(pair.mlp.buffers)}")
    for name, b in pair.mlp.buffers.items():
        b.copy_(buffers[name])
    twin_mod.load_buffers(pair.twin, ck.get("twin_buffers", {}))
    streams = ck["rank_streams"][rank] if ck.get("rank_streams") else ck
    if streams.get("manual_rng") is not None and pair.mlp.generator is not None:
        pair.mlp.generator.set_state(streams["manual_rng"])
    if streams.get("twin_rng") is not None and hasattr(pair.twin, "_rng_state"):
        pair.twin._rng_state = streams["twin_rng"].clone()
