"""The pictures `refnet train --out` draws: loss curves of both sides and a decision boundary.

matplotlib is optional (`pip install refnet[plot]`): callers check `available()` first, and the
matplotlib imports sit inside the functions so that refnet imports without it.  Figures use the
Agg canvas directly (no pyplot global state) and are written atomically.
"""
import numpy as np
import torch

from refnet.atomic import write_atomic
from refnet.compare import same_bits

PALETTE = ["tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown",
           "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]


def available():
    """True when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401  (optional dependency)
    except ImportError:
        return False
    return True


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional dependency
    from matplotlib.figure import Figure  # optional dependency
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global state
    return fig


def _save_png(fig, path):
    write_atomic(path, lambda f: fig.savefig(f, format="png"))


def plot_losses(path, spec, losses_m, losses_t, summary):
    """Both loss curves (top) and |manual − twin| per step (bottom); marks where the losses
    stopped being finite."""
    fig = _figure(8, 6)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    steps = torch.arange(losses_m.numel()).numpy()
    lm, lt = losses_m.double().numpy(), losses_t.double().numpy()
    # |manual − twin| in torch: inf − inf gives NaN there without numpy's RuntimeWarning.
    d = (losses_m.double() - losses_t.double()).abs()
    finite = torch.isfinite(d)
    diff, finite = d.numpy(), finite.numpy()
    top.plot(steps, lm, color="tab:blue", lw=2.5, label="manual")
    top.plot(steps, lt, color="tab:orange", lw=1.2, ls="--", label="autograd twin")
    shown_m, shown_t = lm[finite], lt[finite]
    if shown_m.size and (shown_m > 0).all() and (shown_t > 0).all():
        top.set_yscale("log")
    top.set_ylabel(f"loss ({spec.loss})")
    title = f"{spec.name}: {spec.device}/{spec.dtype}, tier {summary['tier']} "
    k = summary.get("first_nonfinite_step")
    if k is None:
        title += f"({summary['identical_steps']}/{summary['steps']} steps identical"
    else:
        both = (summary.get("first_nonfinite_step_manual")
                == summary.get("first_nonfinite_step_twin"))
        same = same_bits(losses_m, losses_t).numpy()
        title += (f"({int((same & finite).sum())}/{int(finite.sum())} finite steps identical;\n"
                  f"loss non-finite from step {k}" + (" on both sides" if both else "")
                  + ", not drawn beyond it")
        for ax in (top, bottom):
            ax.axvline(k, color="tab:red", lw=1.2, ls=":")
        top.text(k, 0.5, f" non-finite (NaN/inf) from step {k}", color="tab:red", rotation=90,
                 ha="right", va="center", transform=top.get_xaxis_transform())
        top.set_xlim(-0.5, max(len(steps) - 0.5, k + 0.5))
    top.set_title(title + ")")
    top.legend()
    top.grid(alpha=0.3)
    nonzero = finite & (diff > 0)
    if nonzero.any():
        bottom.semilogy(steps[nonzero], diff[nonzero], ".", color="tab:red", ms=3)
    else:
        bottom.set_yscale("log")
        bottom.set_ylim(1e-20, 1e-15)
        where = "every step" if k is None else "every step with finite losses"
        bottom.text(0.5, 0.5, f"|manual − twin| = 0 at {where} (bitwise)", ha="center",
                    va="center", transform=bottom.transAxes)
    bottom.set_ylabel("|manual − twin|")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    _save_png(fig, path)


def plot_boundary(path, spec, classify, x, labels, summary):
    """The predicted class over the plane of 2-D inputs x, with the labelled points on top.
    classify(grid) -> (M,) class indices of the model drawn (the manual MLP's)."""
    from matplotlib.colors import ListedColormap  # optional dependency
    xc, yc = x.detach().double().cpu().numpy(), labels.cpu().numpy()
    lo, hi = xc.min(0), xc.max(0)
    pad = 0.15 * (hi - lo) + 1e-3
    g0, g1 = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], 300),
                         np.linspace(lo[1] - pad[1], hi[1] + pad[1], 300))
    grid = torch.from_numpy(np.stack([g0.ravel(), g1.ravel()], 1)).to(x.dtype).to(x.device)
    with torch.no_grad():
        cls = classify(grid).cpu().numpy().reshape(g0.shape)
    classes = max(int(yc.max()), int(cls.max())) + 1
    cmap = ListedColormap([PALETTE[c % len(PALETTE)] for c in range(classes)])
    fig = _figure(6, 6)
    ax = fig.subplots()
    ax.contourf(g0, g1, cls, levels=np.arange(classes + 1) - 0.5, cmap=cmap, alpha=0.25)
    ax.scatter(xc[:, 0], xc[:, 1], c=yc, cmap=cmap, vmin=-0.5, vmax=classes - 0.5,
               edgecolors="k", s=60 if len(yc) < 50 else 20)
    acc = summary.get("accuracy_manual")
    ax.set_title(f"{spec.name}: manual model's predicted class"
                 + (f" (train accuracy {100 * acc:.1f} %)" if acc is not None else ""))
    ax.set_xlabel("x0")
    ax.set_ylabel("x1")
    fig.tight_layout()
    _save_png(fig, path)
