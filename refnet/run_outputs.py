"""What a finished training run reports and writes: summary.json's dict, losses.csv and the plots.

Written by refnet.train's loop (one process, or rank 0 of a data-parallel run); every file is
written atomically.  Accuracy is measured in eval mode (running statistics, no dropout).
"""
import contextlib
import os

import torch

from refnet import plots
from refnet.atomic import write_atomic
from refnet.checkpoint import CHECKPOINT_NAME
from refnet.compare import same_bits
from refnet.report import write_json


def labels_of(target):
    """Class labels of a classification target: int labels, 0/1 column, or one-hot rows; else None."""
    if target.dtype == torch.int64:
        return target
    binary = bool(((target == 0) | (target == 1)).all())
    if not binary or target.dim() != 2:
        return None
    if target.shape[1] == 1:
        return target[:, 0].to(torch.int64)
    return target.argmax(1) if bool((target.sum(1) == 1).all()) else None


def predict_class(output):
    """(N, C) outputs -> (N,) classes: argmax, or output > 0.5 for a single output."""
    return (output[:, 0] > 0.5).to(torch.int64) if output.shape[1] == 1 else output.argmax(1)


@contextlib.contextmanager
def _eval_mode(*models):
    """Evaluation mode (running statistics, no dropout, no dropout stream advanced) for the
    models inside the block; each gets back the mode it had."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _classify_eval(mlp, grid):
    """The manual MLP's predicted class for each row of grid, in eval mode."""
    with _eval_mode(mlp):
        return predict_class(mlp.predict(grid)[0])


def _accuracy(output, labels):
    return float((predict_class(output).cpu() == labels.cpu()).double().mean())


def run_summary(spec, example, tier, state, losses_m, losses_t, pair, x, target, seconds):
    """summary.json's dict for a run (one process or data parallel; state: refnet.train.RunState):
    status, tiers, final losses, non-finite steps, accuracy on classification data."""
    n, status, message, start = losses_m.numel(), state.status, state.message, state.start
    summary = {
        "name": spec.name, "example": example, "status": status, "divergence": None,
        "message": message, "device": spec.device, "dtype": spec.dtype, "steps": n,
        "steps_planned": spec.steps, "resumed_from": start if start else None,
        "allowed_tier": tier, "tier": state.worst, "comparisons": state.checks,
        "last_checkpoint": state.last_checkpoint,
        "final_loss_manual": float(losses_m[-1]) if n else None,
        "final_loss_twin": float(losses_t[-1]) if n else None,
        "identical_steps": int(same_bits(losses_m, losses_t).sum()) if n else 0,
        "max_abs_loss_diff": float((losses_m.double() - losses_t.double()).abs().max()) if n else 0.0,
        "spec": spec.to_dict(), "seconds": round(seconds, 3), "torch": str(torch.__version__),
    }
    if status == "diverged":
        summary["divergence"] = message
    summary.update(_step_fields(spec, state))
    # NaN/inf on both sides at the same step is agreement, not divergence, but worth saying.
    k_m, k_t = _first_nonfinite(losses_m), _first_nonfinite(losses_t)
    summary["first_nonfinite_step"] = k_m if k_t is None else k_t if k_m is None else min(k_m, k_t)
    summary["first_nonfinite_step_manual"], summary["first_nonfinite_step_twin"] = k_m, k_t
    summary["nonfinite"] = _nonfinite_note(k_m, k_t, losses_m, losses_t)
    if summary["nonfinite"] and status == "completed":
        summary["status"] = f"completed (non-finite from step {summary['first_nonfinite_step']})"
    labels = labels_of(target)
    if labels is not None:
        with _eval_mode(pair.mlp, pair.twin), torch.no_grad():
            summary["accuracy_manual"] = _accuracy(pair.mlp.predict(x)[0], labels)
            summary["accuracy_twin"] = _accuracy(pair.twin(x), labels)
    return summary


def _step_fields(spec, state):
    """The schedule's first and last rate, and how many steps clipping was active on (its
    coefficient < 1) with the largest total norm, when the spec has them."""
    out = {}
    if state.lrs:
        out["lr_first"], out["lr_last"] = state.lrs[0], state.lrs[-1]
    if state.clip_coefs:
        # a step the GradScaler skipped clipped nothing (its norm is inf or NaN): counted apart
        applied = [(n, c) for i, (n, c) in enumerate(zip(state.clip_norms, state.clip_coefs))
                   if not (state.skipped and state.skipped[i])]
        out["clipping"] = {"max_norm": spec.clip_grad_norm["max_norm"],
                           "norm_type": spec.clip_grad_norm["norm_type"],
                           "clipped_steps": sum(c < 1 for _, c in applied),
                           "steps": len(applied),
                           "max_total_norm": max((n for n, _ in applied), default=None)}
    if state.scales:
        skipped = [step for step, k in enumerate(state.skipped) if k]
        out["grad_scaler"] = {"skipped_steps": skipped, "scale_history": _changes(state.scales),
                              "final_scale": state.scales[-1],
                              "same_skips_both_sides": state.status != "diverged"}
    return out


def _changes(values):
    """[[step, value], …] at step 0 and wherever the value changes (a scale history)."""
    return [[i, v] for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def _first_nonfinite(losses):
    bad = (~torch.isfinite(losses)).nonzero()
    return int(bad[0, 0]) if bad.numel() else None


def _nonfinite_note(k_m, k_t, losses_m, losses_t):
    """One line on where the losses stopped being finite (None when they never did)."""
    if k_m is None and k_t is None:
        return None
    if k_m == k_t:
        same = bool((torch.isfinite(losses_m) == torch.isfinite(losses_t)).all())
        return (f"losses non-finite (NaN/inf) from step {k_m} on both sides"
                + (", identically: a faithful reproduction of a diverging run" if same else
                   "; later steps are non-finite on one side only"))
    where = lambda k: f"from step {k}" if k is not None else "never"  # noqa: E731
    return f"losses non-finite (NaN/inf): manual {where(k_m)}, twin {where(k_t)}"


# -- outputs --

CSV_COLUMNS = {"lrs": "lr", "clip_norms": "clip_total_norm", "clip_coefs": "clip_coef",
               "scales": "loss_scale", "skipped": "skipped"}


def write_outputs(out_dir, spec, summary, losses_m, losses_t, pair, x, target, columns=None):
    """losses.csv, summary.json and the plots in out_dir, atomically; the names written (also
    summary["files"]).  columns: the per-step columns beyond the losses (RunState.step_columns:
    the learning rate, the clip total norm and coefficient), appended when the run has them."""
    files = ["losses.csv", "summary.json"]
    columns = columns or {}
    lines = [",".join(["step", "manual_loss", "twin_loss", "abs_diff"]
                      + [CSV_COLUMNS[k] for k in columns])]
    for step, (a, b) in enumerate(zip(losses_m.tolist(), losses_t.tolist())):
        extra = "".join(f",{v[step]!r}" for v in columns.values())
        lines.append(f"{step},{a!r},{b!r},{abs(a - b)!r}{extra}")  # repr: exact, round-trips
    text = "\n".join(lines) + "\n"
    write_atomic(os.path.join(out_dir, "losses.csv"), lambda f: f.write(text.encode()))
    if summary["last_checkpoint"] is not None:
        files.append(CHECKPOINT_NAME)
    if plots.available() and losses_m.numel():
        plots.plot_losses(os.path.join(out_dir, "loss_curves.png"), spec, losses_m, losses_t,
                          summary)
        files.append("loss_curves.png")
        labels = labels_of(target)
        if labels is not None and x.shape[1] == 2:  # 2-D classification data
            plots.plot_boundary(os.path.join(out_dir, "decision_boundary.png"), spec,
                                lambda grid: _classify_eval(pair.mlp, grid), x, labels, summary)
            files.append("decision_boundary.png")
    summary["files"] = files
    write_json(summary, os.path.join(out_dir, "summary.json"))
    return files
