"""Loss functions: forward returns (loss, cache), backward(dloss, cache) returns dy_pred.

Shapes: y_pred (N, C) scores; target (N, C) floats for the regression losses ("values"), (N,)
int64 class labels for the classification losses ("labels").  dloss is the upstream gradient of
the scalar loss (1.0 when the loss is the end of the graph).

Each loss mirrors the PyTorch piece the autograd twin uses (refnet/twin.py::loss_module):
    sum_squared    nn.MSELoss(reduction="sum")      Σ (y − t)²                 (the document's)
    mse            nn.MSELoss()                     Σ (y − t)² / (N·C)
    cross_entropy  nn.CrossEntropyLoss()            −(1/N) Σᵢ log softmax(yᵢ)[tᵢ]
    svm            nn.MultiMarginLoss(margin=1)     (1/N) Σᵢ (1/C) Σ_{j≠tᵢ} max(0, 1 − y_{i,tᵢ} + y_{i,j})
The "svm" loss is PyTorch's multiclass hinge loss.  It is CS231n's SVM loss divided by C: CS231n's
``svm_loss`` is (1/N) Σᵢ Σ_{j≠tᵢ} max(0, s_j − s_{tᵢ} + 1), so multiply ours (and its gradient)
by C to get theirs.  We keep PyTorch's scale so that the twin is the stock module.

L2 regularization (reg · Σ_layers Σ W², weights only, biases not) is ``l2_forward`` /
``l2_backward``; the MLP adds it to the data loss and adds its gradient to dW.
"""

import torch

from manual import _check
from manual.kernel_exp import sleef_exp


def sum_squared_forward(y_pred, target):
    """The document's loss: L = Σ (y_pred − target)², summed over batch and outputs."""
    diff = y_pred - target
    return (diff * diff).sum(), diff


def sum_squared_backward(dloss, diff):
    # ∂L/∂y_pred = 2(y_pred − target); mse_loss_backward: (2·diff)·g in the tensor's dtype.
    return (2.0 * diff) * dloss


def mse_forward(y_pred, target):
    """L = mean over all N·C elements of (y_pred − target)²."""
    diff = y_pred - target
    return (diff * diff).mean(), diff


def mse_backward(dloss, diff):
    # ∂L/∂y_pred = (2/(N·C))·(y_pred − target); the factor 2/numel is formed in double, as Loss.cpp.
    return ((2.0 / diff.numel()) * diff) * dloss


# -- softmax cross-entropy ------------------------------------------------------------------------


def cross_entropy_forward(y_pred, labels):
    """L = −(1/N) Σᵢ log softmax(y_pred)ᵢ[labelsᵢ].  y_pred (N, C), labels (N,) int64.

    Bits: see the note after cross_entropy_backward."""
    n = y_pred.shape[0]
    logp = torch.log_softmax(y_pred, 1)                          # (N, C)
    picked = logp.gather(1, labels.unsqueeze(1)).squeeze(1)      # (N,)
    if y_pred.device.type == "cpu":
        loss = _nll_mean(picked, n)
    else:  # CUDA's nll kernel reduces in its own block order: sum then divide (not bitwise-checked)
        loss = -(picked.sum()) / float(n)
    return loss, (logp, labels)


def cross_entropy_backward(dloss, cache):
    # nll: dlogp = −dloss/N at [i, labelsᵢ], 0 elsewhere (nll_loss_backward: −(g / total_weight)).
    # log_softmax: dy_pred = dlogp − exp(logp)·Σ_c dlogp, the sum per row (one nonzero: exact).
    logp, labels = cache
    n = logp.shape[0]
    dlogp = torch.zeros_like(logp)
    dlogp.scatter_(1, labels.unsqueeze(1), (-(dloss / float(n))).expand(n, 1).contiguous())
    row_sum = dlogp.sum(1, keepdim=True)                          # (N, 1)
    return torch.addcmul(dlogp, log_softmax_backward_exp(logp), row_sum, value=-1)


# Bits: F.cross_entropy(y, t) is nll_loss(log_softmax(y, 1), t).  The forward uses the log_softmax
# primitive (it subtracts the row max first, so logits of ±1e4 are fine) and writes nll_loss by
# hand with the CPU kernel's summation order.  The backward of log_softmax is, in
# SoftMaxKernel.cpp (_vec_host_softmax_backward_lastdim, log variant), per row
#     dlogits = G − exp(logp) · Σ G       as  vec::map2(x - y.exp() * Vec(sum))
# and two details decide its bits: (1) `y.exp()` is Sleef's vectorized exp (expf_u10 / expd_u10),
# not torch.exp (MKL VML), and the two differ in the last bit on ~5–10% of elements; (2) GCC
# contracts `x − e·s` into one FMA.  So on x86 CPUs with AVX2/AVX512 we evaluate Sleef's exp
# algorithm with torch ops (round, FMAs via addcmul, ldexp) — measured bitwise against the kernel
# on every element tried — and form the difference with addcmul (one FMA).


def log_softmax_backward_exp(logp):
    """exp as the CPU log_softmax backward kernel evaluates it: vec::map2 runs every element,
    partial last vector included, through Sleef's exp on AVX2/AVX512 builds (no scalar tail,
    unlike elu_backward), so manual.kernel_exp.sleef_exp applies at every position.

    Elsewhere (CUDA, or a CPU run with ATEN_CPU_CAPABILITY=default) it is torch.exp: not verified
    bitwise there; expect the `ulp` tier at worst.
    """
    if logp.device.type == "cpu" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") \
            and logp.dtype in (torch.float32, torch.float64):
        return sleef_exp(logp)
    return torch.exp(logp)


NLL_LEVELS = 8        # nll_loss_out_frame's cascade_sum_num_levels
NLL_LEVEL_POWER = 4   # its level_power: max(4, CeilLog2(N) / 8), i.e. 4 for N ≤ 2^39
NLL_LEVEL_STEP = 1 << NLL_LEVEL_POWER


def _nll_mean_reference(picked, n):
    """−(1/N) Σ picked, one sample at a time exactly as nll_loss_out_frame (LossNLL.cpp) loops.

    The plain reference for ``_nll_mean`` (O(N) tensor ops; tests compare the two bit for bit).
    The kernel keeps 8 partial sums; each sample is subtracted from partial 0, and whenever the
    sample index b has its low 4·(j+1) bits zero, partial j is folded into partial j+1.  At the
    end partials 0..7 are added in order, and the sum is divided by (scalar_t)N.
    """
    zero = torch.zeros((), dtype=picked.dtype, device=picked.device)
    partial = [zero] * NLL_LEVELS
    for b in range(n):
        partial[0] = partial[0] - picked[b]
        for j in range(NLL_LEVELS - 1):
            if b & ((NLL_LEVEL_STEP - 1) << (NLL_LEVEL_POWER * j)):
                break
            partial[j + 1] = partial[j + 1] + partial[j]
            partial[j] = zero
    total = zero
    for p in partial:
        total = total + p
    return total / float(n)


def sequential_sum_into(acc, index, values, alpha=1):
    """acc[index[i]] += alpha·values[i] for i = 0, 1, … in that order, each add rounded in the
    tensor's dtype; returns acc.

    On the CPU, ``index_add_`` of a 1-D tensor is exactly this serial loop (TensorAdvancedIndexing.cpp,
    index_add_cpu_out: ``*self_ip += source[i] * alpha``; ·1 and ·(−1) are exact), one thread, so it
    sums many short sequences in their written order in one op — unlike ``sum``, which vectorizes
    and blocks.  acc, index, values: 1-D.
    """
    return acc.index_add_(0, index, values, alpha=alpha)


class NllCascade:
    """nll_loss_out_frame's cascade for N samples, as a fixed plan of sequential sums.

    The kernel's cascade (``_nll_mean_reference`` follows it one sample at a time) is a fixed
    blocked summation.  Level j starts at 0, takes its inputs one by one (level 0: the samples,
    subtracted) and, after input m with m % 16 == 0 (m = 0 included), hands its sum to level
    j+1 and restarts at 0.  So its hand-offs are the sums of the groups {v₀}, {v₁..v₁₆},
    {v₁₇..v₃₂}, … — input m is in group (m + 15) // 16 — and what it holds at the end is the sum
    of the incomplete last group (0 if there is none).  Level 7 never hands off: everything it
    receives is one group.  A level that receives a single value hands it up unchanged
    (0 + v = v: a sum started at +0 is never −0), so the levels stop there and that value is
    what partial 7 ends with.  Partials that are 0 are left out of the final sum (s + 0 = s for
    the same reason); the others are added in level order, starting from 0, and divided by N.

    All levels' group sums live in one flat buffer of ``size`` entries: level j's in
    ``[offset_j, offset_j + groups_j)``.  ``levels``: (offset, groups, alpha, group index
    (inputs,) int64, where its inputs start: None for the samples (level 0), else the offset of
    the level below, whose first sums they are); ``kept``: (P,) int64 positions of the partials
    to add at the end.
    """

    def __init__(self, n, device="cpu"):
        self.n, self.levels, kept = n, [], []
        offset, length, level, last = 0, n, 0, None
        while level < NLL_LEVELS and (length > 1 or level == 0):
            if level == NLL_LEVELS - 1:
                group = torch.zeros(length, dtype=torch.int64, device=device)
                groups = 1
            else:
                group = torch.arange(NLL_LEVEL_STEP - 1, length + NLL_LEVEL_STEP - 1,
                                     device=device) // NLL_LEVEL_STEP
                groups = (length - 1 + NLL_LEVEL_STEP - 1) // NLL_LEVEL_STEP + 1
            self.levels.append((offset, groups, -1 if level == 0 else 1, group, last))
            if level == NLL_LEVELS - 1:
                kept.append(offset)                       # partial 7 sums all it receives
            elif (length - 1) % NLL_LEVEL_STEP:           # an incomplete last group: kept
                kept.append(offset + groups - 1)
                length = groups - 1
            else:
                length = groups
            last, offset, level = offset, offset + groups, level + 1
        if level < NLL_LEVELS:                            # stopped at a single hand-off:
            kept.append(last)                             # the value rising to partial 7
        self.size = offset
        self.kept = torch.tensor(kept, dtype=torch.int64, device=device)
        self.kept_into = torch.zeros(len(kept), dtype=torch.int64, device=device)

    def mean(self, picked, sums, kept_values, total):
        """−(1/N) Σ picked with the kernel's bits, in 3 + (levels) ops, into the given buffers:
        sums (size,), kept_values (P,), total (1,), all of picked's dtype.  Returns a new 0-d
        tensor."""
        sums.zero_()
        for offset, groups, alpha, group, below in self.levels:
            inputs = picked if below is None else sums[below:below + group.shape[0]]
            sequential_sum_into(sums[offset:offset + groups], group, inputs, alpha)
        torch.index_select(sums, 0, self.kept, out=kept_values)
        sequential_sum_into(total.zero_(), self.kept_into, kept_values)
        return total[0] / float(self.n)


def _nll_mean(picked, n):
    """−(1/N) Σ picked with the bits of nll_loss_out_frame, in O(1) tensor ops (see NllCascade;
    ``_nll_mean_reference`` is the plain one-sample-at-a-time version)."""
    plan = NllCascade(n, picked.device)
    new = lambda size: picked.new_empty(size)  # noqa: E731
    return plan.mean(picked, new(plan.size), new(plan.kept.shape[0]), new(1))


# -- multiclass SVM (hinge) loss, PyTorch's MultiMarginLoss(p=1, margin=1) ---------------------------


def svm_forward(y_pred, labels, margin=1.0):
    """L = (1/N) Σᵢ (1/C) Σ_{j≠tᵢ} max(0, margin − y_{i,tᵢ} + y_{i,j})  (= CS231n's SVM loss / C).

    Bits: summed as multi_margin_loss_cpu_kernel: per row, classes in order in the tensor's
    dtype (inactive classes skipped; adding +0 instead is the same), then ÷C; rows accumulated
    in order in double (acc_type), ÷N in double, cast back.  On the CPU both sums are one
    sequential-sum op each (sequential_sum_into), whatever N and C; nothing is read to the host.
    """
    n, c = y_pred.shape
    y_target = y_pred.gather(1, labels.unsqueeze(1))              # (N, 1)
    z = (margin - y_target) + y_pred                              # (N, C) margins
    not_target = torch.arange(c, device=y_pred.device).unsqueeze(0) != labels.unsqueeze(1)
    active = (z > 0) & not_target                                 # (N, C)
    hinge = torch.where(active, z, 0.0)
    if y_pred.device.type == "cpu":
        row_of = torch.arange(n).repeat_interleave(c)             # (N·C,) row of each element
        row = sequential_sum_into(y_pred.new_zeros(n), row_of, hinge.reshape(-1)) / c
        total = sequential_sum_into(torch.zeros(1, dtype=torch.float64),
                                    torch.zeros(n, dtype=torch.int64), row.double())[0]
    else:  # CUDA's kernel reduces in its own order: plain sums (not bitwise-checked)
        row_of = None
        row = hinge.sum(1) / c
        total = row.double().sum()
    loss = (total / n).to(y_pred.dtype)
    return loss, (active, labels, n, c, row_of)


def svm_backward(dloss, cache):
    # ∂L/∂y_{i,j} = 1/(N·C) for each active j ≠ tᵢ;  ∂L/∂y_{i,tᵢ} = −Σ_j of those (subtracted in
    # class order, as the kernel does); the factor 1/(N·C) is formed in double, then cast.
    active, labels, n, c, row_of = cache
    g = torch.tensor(1.0 / (n * c), dtype=torch.float64).to(dloss.dtype)
    zero = torch.zeros((), dtype=dloss.dtype, device=active.device)
    dy_pred = torch.where(active, g.to(active.device), zero)                 # (N, C)
    dy_target = torch.zeros(n, dtype=dloss.dtype, device=active.device)
    if row_of is not None:   # CPU: 0 − dy_pred[:, 0] − dy_pred[:, 1] − …, one sequential op
        sequential_sum_into(dy_target, row_of, dy_pred.reshape(-1), alpha=-1)
    else:
        for j in range(c):
            dy_target = dy_target - dy_pred[:, j]
    dy_pred = dy_pred.scatter(1, labels.unsqueeze(1), dy_target.unsqueeze(1))
    return dy_pred * dloss


# -- L2 regularization -----------------------------------------------------------------------------


def l2_forward(weights, reg):
    """R = reg · Σ_layers Σ W², weights (H, D) in layer order; biases are not regularized.

    As the twin writes it: s = W₀.pow(2).sum(); s = s + W₁.pow(2).sum() …; R = reg · s.
    """
    total = None
    for w in weights:
        s = w.pow(2).sum()
        total = s if total is None else total + s
    return total * reg


def l2_backward(dloss, weights, reg):
    # ∂R/∂W = reg · 2W.  autograd: MulBackward gives dloss·reg, PowBackward0 gives
    # grad · (2.0 · W.pow(1)); the result is then added to the data gradient of W (one add).
    g = dloss * reg
    return [g * (2.0 * w) for w in weights]


# name -> (forward, backward, kind of target: "values" (N, C) float, or "labels" (N,) int64)
LOSSES = {
    "sum_squared": (sum_squared_forward, sum_squared_backward, "values"),
    "mse": (mse_forward, mse_backward, "values"),
    "cross_entropy": (cross_entropy_forward, cross_entropy_backward, "labels"),
    "svm": (svm_forward, svm_backward, "labels"),
}


def _lookup(name):
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"loss: unknown name {name!r}; expected one of {', '.join(LOSSES)}") from None


def target_kind(name):
    return _lookup(name)[2]


def loss_forward(name, y_pred, target):
    """y_pred (N, C), target (N, C) values or (N,) labels -> (scalar loss, cache).

    Labels are range-checked once per labels tensor (manual._check.labels): that check reads from
    the device, so on CUDA it syncs the first time a tensor is seen, not every step.
    """
    fwd, _, kind = _lookup(name)
    _check.loss_target(kind, y_pred, target)
    return fwd(y_pred, target)


def loss_backward(name, dloss, cache):
    """dloss (0-d) -> dy_pred (N, C)."""
    return _lookup(name)[1](dloss, cache)


def check_labels(labels, n_classes):
    """Range-check a data set's class labels (N,) once: one read from the device."""
    _check.labels(labels, n_classes)


def labels_checked(batch, n_classes):
    """Declare `batch`, cut from labels already passed to check_labels, in range: the next loss
    on it reads nothing from the device (no sync per mini-batch on CUDA)."""
    _check.trust_labels(batch, n_classes)
