"""Section 8: vectorized backprop with the document's matrices — ReLU on a vector, a matrix
product, and f(x, W) = ‖W·x‖² — every value the document lists, by hand and by autograd."""
import torch

from manual.activations import relu_backward, relu_forward
from refnet.examples import register
from refnet.examples._common import as_tensor, doc_check, fd_check, twin_check

VECTOR_RELU = {"x": [1.0, -2.0, 3.0, -1.0], "dy": [4.0, -1.0, 5.0, 9.0],
               "y": [1.0, 0.0, 3.0, 0.0], "dx": [4.0, 0.0, 5.0, 0.0]}
MATMUL = {
    "x": [[2.0, 1.0, -3.0], [-3.0, 4.0, 2.0]],
    "w": [[3.0, 2.0, 1.0, -1.0], [2.0, 1.0, 3.0, 2.0], [3.0, 2.0, 1.0, -2.0]],
    "dy": [[2.0, 3.0, -3.0, 9.0], [-8.0, 1.0, 4.0, 6.0]],
    "y": [[-1.0, -1.0, 2.0, 6.0], [5.0, 2.0, 11.0, 7.0]],
    "dx": [[0.0, 16.0, -9.0], [-24.0, 9.0, -30.0]],
    "dw": [[28.0, 3.0, -18.0, 0.0], [-30.0, 7.0, 13.0, 33.0], [-22.0, -7.0, 17.0, -15.0]],
}
L2 = {"W": [[0.1, 0.5], [-0.3, 0.8]], "x": [0.2, 0.4],
      "q": [0.22, 0.26], "f": 0.116, "dq": [0.44, 0.52],
      "dW": [[0.088, 0.176], [0.104, 0.208]], "dx": [-0.112, 0.636]}


def _doc(values, table, keys, atol=0.0):
    return {k: (table[k], atol) for k in keys if k in values}


@register("vector_relu", "y = max(0, x) on x = [1, -2, 3, -1], upstream [4, -1, 5, 9]", "8")
def run_vector_relu(ctx):
    x, dy = as_tensor(VECTOR_RELU["x"], ctx), as_tensor(VECTOR_RELU["dy"], ctx)
    y, cache = relu_forward(x)
    m = {"y": y, "dx": relu_backward(dy, cache)}
    xt = x.clone().requires_grad_()
    yt = torch.relu(xt)
    yt.backward(dy)
    checks = [twin_check("values_and_grads", m, {"y": yt.detach(), "dx": xt.grad}, ctx),
              doc_check("document", m, _doc(m, VECTOR_RELU, ("y", "dx")))]
    if ctx.dtype == torch.float64:
        x_fd = as_tensor([1.0, -2.0, 3.0, -1.0], ctx)  # no element at the kink
        checks.append(fd_check("finite_differences", lambda x: torch.relu(x) * dy, {"x": x_fd},
                               {"x": m["dx"]}))
    return checks


def matmul_manual(x, w, dy):
    """y = x·w; x (N, D), w (D, M), dy (N, M) -> y, dx = dy·wᵀ, dw = xᵀ·dy.
    Operand order as mm's derivative formula: dx = dy.mm(wᵀ), dw = xᵀ.mm(dy)."""
    y = x.mm(w)
    return {"y": y, "dx": dy.mm(w.t()), "dw": x.t().mm(dy)}


@register("matrix_multiply", "y = x·w with the document's 2×3 and 3×4 matrices", "8")
def run_matrix_multiply(ctx):
    x, w, dy = (as_tensor(MATMUL[k], ctx) for k in ("x", "w", "dy"))
    m = matmul_manual(x, w, dy)
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    yt = xt.mm(wt)
    yt.backward(dy)
    checks = [twin_check("values_and_grads", m, {"y": yt.detach(), "dx": xt.grad, "dw": wt.grad}, ctx),
              doc_check("document", m, _doc(m, MATMUL, ("y", "dx", "dw")))]
    if ctx.dtype == torch.float64:
        checks.append(fd_check("finite_differences", lambda x, w: x.mm(w) * dy,
                               {"x": x.clone(), "w": w.clone()}, {"x": m["dx"], "w": m["dw"]}))
    return checks


def l2_manual(W, x):
    """f = ‖W·x‖²; W (M, D), x (D,) -> q, f, dq = 2q, dW = dq·xᵀ, dx = Wᵀ·dq.
    As autograd: q = mv(W, x); f = sum(q²) with pow's derivative 2·q times the upstream 1;
    mv's derivatives: dW = dq ⊗ x (ger), dx = Wᵀ.mv(dq)."""
    q = W.mv(x)
    f = (q ** 2).sum()
    df = torch.ones_like(f)
    dq = df.expand_as(q) * (2 * q)
    return {"q": q, "f": f, "dq": dq, "dW": torch.outer(dq, x), "dx": W.t().mv(dq)}


@register("vectorized_l2", "f(x, W) = ‖W·x‖² with W = [[.1, .5], [-.3, .8]], x = [.2, .4]", "8")
def run_vectorized_l2(ctx):
    W, x = as_tensor(L2["W"], ctx), as_tensor(L2["x"], ctx)
    m = l2_manual(W, x)
    Wt, xt = W.clone().requires_grad_(), x.clone().requires_grad_()
    q = Wt.mv(xt)
    q.retain_grad()
    f = (q ** 2).sum()
    f.backward()
    t = {"q": q.detach(), "f": f.detach(), "dq": q.grad, "dW": Wt.grad, "dx": xt.grad}
    # the document's numbers are exact decimals; binary floating point is within a few ulp of them
    checks = [twin_check("values_and_grads", m, t, ctx),
              doc_check("document", m, _doc(m, L2, ("q", "f", "dq", "dW", "dx"), atol=1e-15))]
    if ctx.dtype == torch.float64:
        checks.append(fd_check("finite_differences", lambda W, x: (W.mv(x) ** 2).sum(),
                               {"W": W.clone(), "x": x.clone()}, {"W": m["dW"], "x": m["dx"]}))
    return checks
