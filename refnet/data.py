"""Seeded data sets, identical on every device: drawn in float64 on the CPU, then cast and moved.

Each generator returns (x (N, D) float, y) where y is (N,) int64 class labels for the
classification sets (xor, circles, spiral) and (N, C) float targets for `random`.
`load_data(spec)` picks a spec's data set and shapes its targets for the spec's loss.
"""
import math
import os

import numpy as np
import torch

from manual.losses import target_kind

DATASETS = ("xor", "circles", "spiral", "random", "names")
TOKEN_DATASETS = ("names",)  # integer token inputs: need an embedding


def _out(x, y, dtype, device):
    y = y.to(device=device) if y.dtype == torch.int64 else y.to(dtype=dtype, device=device)
    return x.to(dtype=dtype, device=device), y


def xor(n_copies=1, noise=0.0, seed=0, dtype=torch.float64, device="cpu"):
    """The four XOR points (0,0)→0, (0,1)→1, (1,0)→1, (1,1)→0, repeated n_copies times (+ noise)."""
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0], dtype=torch.int64)
    x, y = x.repeat(n_copies, 1), y.repeat(n_copies)
    if noise:
        gen = torch.Generator().manual_seed(seed)
        x = x + noise * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return _out(x, y, dtype, device)


def circles(n=200, noise=0.1, radii=(1.0, 2.0), seed=0, dtype=torch.float64, device="cpu"):
    """Two concentric rings (class 0 inside at radius ≈1, class 1 outside at ≈2), n points in all."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n, dtype=torch.int64) % 2
    radius = torch.tensor(radii, dtype=torch.float64)[y]
    radius = radius + noise * torch.randn(n, generator=gen, dtype=torch.float64)
    angle = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1)
    return _out(x, y, dtype, device)


def spiral(n_per_class=100, classes=3, noise=0.2, seed=0, dtype=torch.float64, device="cpu"):
    """CS231n's spiral: `classes` arms of n_per_class points each, radius 0→1, 4 radians of turn."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(classes):
        r = torch.linspace(0.0, 1.0, n_per_class, dtype=torch.float64)
        t = torch.linspace(c * 4.0, (c + 1) * 4.0, n_per_class, dtype=torch.float64)
        t = t + noise * torch.randn(n_per_class, generator=gen, dtype=torch.float64)
        xs.append(torch.stack([r * torch.sin(t), r * torch.cos(t)], 1))
        ys.append(torch.full((n_per_class,), c, dtype=torch.int64))
    return _out(torch.cat(xs), torch.cat(ys), dtype, device)


def random(n=64, d_in=1000, d_out=10, seed=0, dtype=torch.float64, device="cpu"):
    """Gaussian inputs and targets, as the document's program: x ~ randn(N, D), y ~ randn(N, C)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, d_in), generator=gen, dtype=torch.float64)
    y = torch.randn((n, d_out), generator=gen, dtype=torch.float64)
    return _out(x, y, dtype, device)


# --- character-level names (makemore), generated here: no download ---------------------------------
CHARS = "." + "abcdefghijklmnopqrstuvwxyz"   # '.' (index 0) marks the start and the end of a name
_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "z", "br", "ch", "cl", "dr", "gr", "kr", "sh", "st", "th", "tr", "qu", "x", "y")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ie", "oa", "ou", "y")
_CODAS = ("", "", "", "n", "l", "r", "s", "th", "nd", "x", "m", "k")


def name_list(n=2000, seed=0):
    """n pronounceable lowercase names from a seeded syllable generator (1–3 syllables each)."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    names = []
    for _ in range(n):
        syllables = 1 + int(torch.randint(3, (1,), generator=gen))
        names.append("".join(pick(_ONSETS) + pick(_VOWELS) + pick(_CODAS) for _ in range(syllables)))
    return names


def names(context=3, n_names=2000, seed=0, device="cpu"):
    """makemore's data set: every (context characters -> next character) pair of the names, with
    '.' padding at the start and '.' as the end token.  x (N, context) int64, y (N,) int64 in [0, 27)."""
    xs, ys = [], []
    for word in name_list(n_names, seed):
        window = [0] * context
        for ch in word + ".":
            ix = CHARS.index(ch)
            xs.append(window)
            ys.append(ix)
            window = window[1:] + [ix]
    return (torch.tensor(xs, dtype=torch.int64, device=device),
            torch.tensor(ys, dtype=torch.int64, device=device))


def load_npz(path, dtype=torch.float64, device="cpu"):
    """User data: an .npz with a float array `x` (N, D) (or integer token indices (N, T) for an
    embedding spec) and `y`, either (N,) int labels or (N, C)."""
    if not os.path.isfile(path):
        raise ValueError(f"data: file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            files = set(f.files)
            arrays = {k: f[k] for k in ("x", "y") if k in files}
    except Exception as exc:  # not a zip, pickled objects, truncated members …
        raise ValueError(f"data: {path} is not a readable .npz file ({exc.__class__.__name__})") from None
    missing = {"x", "y"} - set(arrays)
    if missing:
        raise ValueError(f"data: {path} lacks array(s) {sorted(missing)}; expected 'x' and 'y'")
    x_np, y_np = arrays["x"], arrays["y"]
    if x_np.ndim != 2 or not np.issubdtype(x_np.dtype, np.number):
        raise ValueError(f"data: x in {path} must be a 2-D numeric array, got shape {list(x_np.shape)} "
                         f"dtype {x_np.dtype}")
    if y_np.shape[:1] != x_np.shape[:1] or y_np.ndim not in (1, 2):
        raise ValueError(f"data: y in {path} must have shape [{x_np.shape[0]}] or [{x_np.shape[0]}, C], "
                         f"got {list(y_np.shape)}")
    if x_np.shape[0] == 0:
        raise ValueError(f"data: {path} has no rows")
    if not np.isfinite(x_np).all():
        raise ValueError(f"data: x in {path} contains NaN or infinite values")
    x = torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.float64))
    if y_np.ndim == 1 and np.issubdtype(y_np.dtype, np.integer):
        if (y_np < 0).any():
            raise ValueError(f"data: labels y in {path} must be >= 0")
        y = torch.from_numpy(y_np.astype(np.int64))
    else:
        y = torch.from_numpy(np.ascontiguousarray(y_np, dtype=np.float64))
        if y.dim() == 1:
            y = y.unsqueeze(1)
    if np.issubdtype(x_np.dtype, np.integer):  # token indices (an embedding spec): kept integer
        return torch.from_numpy(x_np.astype(np.int64)).to(device), _out(x, y, dtype, device)[1]
    return _out(x, y, dtype, device)


def make_targets(y, kind, out_dim, dtype):
    """Targets for a loss: kind "values" wants (N, C) floats, "labels" wants (N,) int64.

    Labels fed to a regression loss become a column (C = 1) or one-hot rows (C > 1).
    """
    if kind == "labels":
        if y.dtype != torch.int64 or y.dim() != 1:
            raise ValueError(f"data: this loss needs integer class labels of shape [N], got "
                             f"{y.dtype} {list(y.shape)}")
        if int(y.max()) >= out_dim:
            raise ValueError(f"sizes: the last layer has {out_dim} output(s) but the labels go up to "
                             f"{int(y.max())}")
        return y
    if y.dtype == torch.int64:
        if out_dim == 1:
            return y.to(dtype).unsqueeze(1)
        if int(y.max()) >= out_dim:
            raise ValueError(f"sizes: the last layer has {out_dim} output(s) but the labels go up to "
                             f"{int(y.max())}")
        return torch.nn.functional.one_hot(y, out_dim).to(dtype)
    if y.dim() != 2 or y.shape[1] != out_dim:
        raise ValueError(f"sizes: the last layer has {out_dim} output(s) but the targets have shape "
                         f"{list(y.shape)}")
    return y.to(dtype)


def check_batch_rows(n, batch_size):
    """Batch norm in training needs at least 2 rows in every mini-batch of an n-row data set."""
    full = batch_size is None or batch_size >= n
    if n == 1 or (not full and (batch_size == 1 or n % batch_size == 1)):
        raise ValueError(f"batch_size: batch norm in training needs at least 2 rows in every batch; "
                         f"batch_size {batch_size} on {n} rows leaves a batch of 1")


def batches(n, batch_size, steps, seed):
    """Index tensors for `steps` mini-batches: one seeded generator, a fresh permutation per epoch,
    the last partial batch of each epoch kept as it is.  batch_size None or ≥ n: full batch."""
    if batch_size is None or batch_size >= n:
        return [None] * steps
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out.extend(perm[i:i + batch_size] for i in range(0, n, batch_size))
    return out[:steps]


def load_data(spec):
    """(x, target) for a spec, on its device and dtype, targets shaped for its loss."""
    dtype, device = spec.torch_dtype, spec.device
    n = spec.n_samples
    if spec.data == "xor":
        x, y = xor(n_copies=max(1, (n or 4) // 4), dtype=dtype, device=device)
    elif spec.data == "circles":
        x, y = circles(n=n or 200, seed=spec.seed, dtype=dtype, device=device)
    elif spec.data == "spiral":
        x, y = spiral(n_per_class=max(1, (n or 300) // 3), seed=spec.seed, dtype=dtype,
                      device=device)
    elif spec.data == "random":
        x, y = random(n=n or 64, d_in=spec.sizes[0], d_out=spec.sizes[-1], seed=spec.seed,
                      dtype=dtype, device=device)
    elif spec.data == "names":
        x, y = names(context=spec.embedding["context"], n_names=n or 2000, seed=spec.seed,
                     device=device)
    else:
        x, y = load_npz(spec.data, dtype=dtype, device=device)
    if spec.embedding is not None:
        if x.is_floating_point():
            raise ValueError(f"embedding: needs integer token data, but data {spec.data!r} is "
                             f"real-valued ({x.dtype})")
        if x.dim() != 2 or x.shape[1] != spec.embedding["context"]:
            raise ValueError(f"embedding: context {spec.embedding['context']} but data "
                             f"{spec.data!r} has shape {list(x.shape)}")
    elif x.shape[1] != spec.sizes[0]:
        raise ValueError(f"sizes: the first layer takes {spec.sizes[0]} inputs but data "
                         f"{spec.data!r} has {x.shape[1]} features")
    if spec.norm == "batchnorm":
        check_batch_rows(x.shape[0], spec.batch_size)
    return x, make_targets(y, target_kind(spec.loss), spec.sizes[-1], dtype)
