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
# NllCascade is used by manual/fast.py through this module
from manual.kernel_order import NllCascade, log_softmax_backward_exp, nll_mean, sequential_sum_into


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
        loss = nll_mean(picked, n)                               # the kernel's cascade
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
# on every element tried — and form the difference with addcmul (one FMA).  The forward's mean
# over samples follows nll_loss_out_frame's summation cascade.  Both are in kernel_order.py.


def cross_entropy_backward_textbook(dloss, cache):
    """The lecture's form, (softmax(y_pred) − onehot(labels))·dloss/N: correct to rounding, not
    bit-identical to autograd (torch.exp and no FMA; see the note above)."""
    # ∂L/∂y_pred = (pᵢ − 1[j = tᵢ])/N,  p = softmax(y_pred) = exp(log softmax)
    logp, labels = cache
    onehot = torch.zeros_like(logp).scatter_(1, labels.unsqueeze(1), 1.0)
    return (torch.exp(logp) - onehot) * (dloss / logp.shape[0])


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
