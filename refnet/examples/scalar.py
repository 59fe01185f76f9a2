"""Sections 1–3: scalar computational graphs, backpropagated by hand with the gates of
manual/gates.py, beside autograd on the same expressions, the document's numbers and finite
differences."""
import torch

from manual import gates
from manual.activations import sigmoid_backward, sigmoid_forward
from refnet.compare import ORACLE_FINITE_DIFFERENCES, Check
from refnet.examples import register
from refnet.examples._common import as_tensor, doc_check, fd_check, twin_check

# --- section 1: f(x, y, z) = (x + y)·z ---------------------------------------------------------
SCALAR_GRAPH_INPUTS = {"x": -2.0, "y": 5.0, "z": -4.0}
# the document's numbers (exact integers): forward and every gradient
SCALAR_GRAPH_DOC = {"q": 3.0, "f": -12.0, "df/dq": -4.0, "df/dz": 3.0, "df/dx": -4.0, "df/dy": -4.0}


def scalar_graph_manual(x, y, z):
    """Forward, then backward from df/df = 1; returns every value and gradient by name."""
    q, add_cache = gates.add_forward(x, y)
    f, mul_cache = gates.mul_forward(q, z)
    df = torch.ones_like(f)
    dq, dz = gates.mul_backward(df, mul_cache)
    dx, dy = gates.add_backward(dq, add_cache)
    return {"q": q, "f": f, "df/dq": dq, "df/dz": dz, "df/dx": dx, "df/dy": dy}


def _leaves(values, ctx):
    return {k: as_tensor(v, ctx).requires_grad_() for k, v in values.items()}


@register("scalar_graph", "f(x,y,z) = (x+y)·z at x=-2, y=5, z=-4", "1")
def run_scalar_graph(ctx):
    inputs = {k: as_tensor(v, ctx) for k, v in SCALAR_GRAPH_INPUTS.items()}
    m = scalar_graph_manual(**inputs)
    leaves = _leaves(SCALAR_GRAPH_INPUTS, ctx)
    q = leaves["x"] + leaves["y"]
    q.retain_grad()
    f = q * leaves["z"]
    f.backward()
    t = {"q": q.detach(), "f": f.detach(), "df/dq": q.grad, "df/dz": leaves["z"].grad,
         "df/dx": leaves["x"].grad, "df/dy": leaves["y"].grad}
    checks = [twin_check("values_and_grads", m, t, ctx),
              doc_check("document", m, {k: (v, 0.0) for k, v in SCALAR_GRAPH_DOC.items()})]
    if ctx.dtype == torch.float64:
        fd_in = {k: v.clone() for k, v in inputs.items()}
        checks.append(fd_check("finite_differences", lambda x, y, z: (x + y) * z, fd_in,
                               {"x": m["df/dx"], "y": m["df/dy"], "z": m["df/dz"]}))
    return checks


# --- section 2: the sigmoid neuron f(w, x) = σ(w0·x0 + w1·x1 + w2) ------------------------------
SIGMOID_NEURON_INPUTS = {"w0": 2.0, "x0": -1.0, "w1": -3.0, "x1": -2.0, "w2": -3.0}
# (value, precision): the "…" values are truncated, so they are good to one unit of the last digit
SIGMOID_NEURON_DOC = {
    "s3": (1.0, 0.0), "L": (0.7310585786, 1e-10), "grad_s3": (0.1966119332, 1e-10),
    "grad_w0": (-0.1966, 1e-4), "grad_x0": (0.3932, 1e-4), "grad_w1": (-0.3932, 1e-4),
    "grad_x1": (-0.5898, 1e-4), "grad_w2": (0.1966, 1e-4),
}
# the lecture's rounding to two decimals
SIGMOID_NEURON_ROUNDED = {"grad_w0": -0.20, "grad_x0": 0.39, "grad_w1": -0.39, "grad_x1": -0.59,
                          "grad_w2": 0.20}
SIGMOID_NEURON_ERRATA = ("document's code corrected: `s= w * x0` reads `s0 = w0 * x0`; full-width "
                         "commas in the parameter list; mixed indentation")


def sigmoid_neuron_manual(w0, x0, w1, x1, w2):
    """The document's flat forward/backward code, corrected (see SIGMOID_NEURON_ERRATA)."""
    # forward
    s0 = w0 * x0
    s1 = w1 * x1
    s2 = s0 + s1
    s3 = s2 + w2
    L, _ = sigmoid_forward(s3)
    # backward
    grad_L = torch.ones_like(L)
    grad_s3 = sigmoid_backward(grad_L, L)       # grad_L · (1 − L) · L
    grad_w2 = grad_s3                           # add: distributes
    grad_s2 = grad_s3
    grad_s0 = grad_s2
    grad_s1 = grad_s2
    grad_w1 = grad_s1 * x1                      # mul: swaps
    grad_x1 = grad_s1 * w1
    grad_w0 = grad_s0 * x0
    grad_x0 = grad_s0 * w0
    return {"s3": s3, "L": L, "grad_s3": grad_s3, "grad_w0": grad_w0, "grad_x0": grad_x0,
            "grad_w1": grad_w1, "grad_x1": grad_x1, "grad_w2": grad_w2}


def _sigmoid_neuron(w0, x0, w1, x1, w2):
    return torch.sigmoid(w0 * x0 + w1 * x1 + w2)


@register("sigmoid_neuron", "σ(w0·x0 + w1·x1 + w2), the document's flat code", "2")
def run_sigmoid_neuron(ctx):
    inputs = {k: as_tensor(v, ctx) for k, v in SIGMOID_NEURON_INPUTS.items()}
    m = sigmoid_neuron_manual(**inputs)
    leaves = _leaves(SIGMOID_NEURON_INPUTS, ctx)
    s3 = leaves["w0"] * leaves["x0"] + leaves["w1"] * leaves["x1"] + leaves["w2"]
    s3.retain_grad()
    L = torch.sigmoid(s3)
    L.backward()
    t = {"s3": s3.detach(), "L": L.detach(), "grad_s3": s3.grad}
    t.update({f"grad_{k}": leaves[k].grad for k in SIGMOID_NEURON_INPUTS})
    checks = [twin_check("values_and_grads", m, t, ctx, note=SIGMOID_NEURON_ERRATA),
              doc_check("document", m, SIGMOID_NEURON_DOC),
              doc_check("document_rounded", m, {k: (v, 0.005) for k, v in
                                                SIGMOID_NEURON_ROUNDED.items()},
                        note="the lecture's two-decimal rounding")]
    if ctx.dtype == torch.float64:
        fd_in = {k: v.clone() for k, v in inputs.items()}
        checks.append(fd_check("finite_differences", _sigmoid_neuron, fd_in,
                               {k: m[f"grad_{k}"] for k in SIGMOID_NEURON_INPUTS}))
    return checks


# --- section 3: patterns in gradient flow ------------------------------------------------------
# gate: (inputs, upstream, the document's output and input gradients)
GATE_DOC = {
    "add": {"inputs": (3.0, 4.0), "upstream": 2.0, "out": 7.0, "grads": (2.0, 2.0)},
    "mul": {"inputs": (2.0, 3.0), "upstream": 5.0, "out": 6.0, "grads": (15.0, 10.0)},
    "max": {"inputs": (4.0, 5.0), "upstream": 9.0, "out": 5.0, "grads": (0.0, 9.0)},
    "copy": {"inputs": (7.0,), "upstream": (4.0, 2.0), "out": 7.0, "grads": (6.0,)},
}
# ties (not in the document): PyTorch's two conventions, both implemented and verified
TIE_CASES = {
    "maximum_tie": {"inputs": (5.0, 5.0), "upstream": 9.0, "grads": (4.5, 4.5)},   # split evenly
    "max_dim_tie": {"inputs": (5.0, 5.0, 1.0), "upstream": 9.0, "grads": (9.0, 0.0, 0.0)},  # first
    "amax_tie": {"inputs": (5.0, 5.0, 5.0, 1.0), "upstream": 9.0, "grads": (3.0, 3.0, 3.0, 0.0)},
}
MAX_CONVENTIONS = ("max gate conventions: torch.maximum / amax / max() split a tie evenly "
                   "(manual.gates.maximum_backward, amax_backward); max(dim) routes all to the first "
                   "maximal index (manual.gates.max_dim_backward). In this project Maxout uses "
                   "max(dim) (first piece gets all); ReLU is threshold_backward (relu'(0) = 0, no "
                   "tie split); LeakyReLU gives the slope at 0; ELU gives alpha at 0.")


def _gate_manual(gate, ins, upstream):
    if gate == "copy":
        uses, _ = gates.copy_forward(ins[0], 2)
        return uses[0], (gates.copy_backward(list(upstream)),)
    fwd, bwd = {"add": (gates.add_forward, gates.add_backward),
                "mul": (gates.mul_forward, gates.mul_backward),
                "max": (gates.maximum_forward, gates.maximum_backward)}[gate]
    out, cache = fwd(*ins)
    return out, bwd(upstream, cache)


def _gate_twin(gate, ins, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in ins]
    if gate == "copy":
        x = leaves[0]
        out = torch.stack([x, x])                   # one value used twice
        out.backward(torch.stack(list(upstream)))
        return x.detach(), (x.grad,)
    out = {"add": torch.add, "mul": torch.mul, "max": torch.maximum}[gate](*leaves)
    out.backward(upstream)
    return out.detach(), tuple(t.grad for t in leaves)


def _gate_values(ctx, gate_fn):
    """Run every gate of the document through gate_fn (_gate_manual or _gate_twin)."""
    values = {}
    for gate, case in GATE_DOC.items():
        ins = [as_tensor(v, ctx) for v in case["inputs"]]
        up = as_tensor(case["upstream"], ctx)
        up = tuple(up.unbind()) if up.dim() else up
        out, grads = gate_fn(gate, ins, up)
        values[f"{gate}.out"] = out
        values[f"{gate}.grads"] = torch.stack(list(grads))
    return values


def gate_patterns_manual(ctx):
    return _gate_values(ctx, _gate_manual)


def ties_manual(ctx):
    values = {}
    a, b = (as_tensor(v, ctx) for v in TIE_CASES["maximum_tie"]["inputs"])
    _, cache = gates.maximum_forward(a, b)
    up = {name: as_tensor(case["upstream"], ctx) for name, case in TIE_CASES.items()}
    values["maximum_tie"] = torch.stack(gates.maximum_backward(up["maximum_tie"], cache))
    x = as_tensor(TIE_CASES["max_dim_tie"]["inputs"], ctx)
    _, cache = gates.max_dim_forward(x, 0)
    values["max_dim_tie"] = gates.max_dim_backward(up["max_dim_tie"], cache)
    x = as_tensor(TIE_CASES["amax_tie"]["inputs"], ctx)
    _, cache = gates.amax_forward(x, 0)
    values["amax_tie"] = gates.amax_backward(up["amax_tie"], cache)
    return values


def ties_twin(ctx):
    values = {}
    a, b = (as_tensor(v, ctx).requires_grad_() for v in TIE_CASES["maximum_tie"]["inputs"])
    torch.maximum(a, b).backward(as_tensor(TIE_CASES["maximum_tie"]["upstream"], ctx))
    values["maximum_tie"] = torch.stack([a.grad, b.grad])
    for name, op in (("max_dim_tie", lambda x: x.max(0).values), ("amax_tie", lambda x: x.amax(0))):
        x = as_tensor(TIE_CASES[name]["inputs"], ctx).requires_grad_()
        op(x).backward(as_tensor(TIE_CASES[name]["upstream"], ctx))
        values[name] = x.grad
    return values


@register("gate_patterns", "add, mul, max, copy gates; max ties both ways", "3")
def run_gate_patterns(ctx):
    m = gate_patterns_manual(ctx)
    t = _gate_values(ctx, _gate_twin)
    expected = {}
    for gate, case in GATE_DOC.items():
        expected[f"{gate}.out"] = (case["out"], 0.0)
        expected[f"{gate}.grads"] = (list(case["grads"]), 0.0)
    tm, tt = ties_manual(ctx), ties_twin(ctx)
    checks = [twin_check("gates", m, t, ctx),
              doc_check("document", m, expected),
              twin_check("ties", tm, tt, ctx, note=MAX_CONVENTIONS),
              doc_check("ties_expected", tm, {k: (list(c["grads"]), 0.0)
                                              for k, c in TIE_CASES.items()}, note=MAX_CONVENTIONS)]
    if ctx.dtype == torch.float64:
        fns = {"add": lambda a, b: a + b, "mul": lambda a, b: a * b,
               "max": lambda a, b: torch.maximum(a, b)}
        verdicts = []
        for gate, fn in fns.items():
            case = GATE_DOC[gate]
            ins = {n: as_tensor(v, ctx) for n, v in zip("ab", case["inputs"])}
            grads = m[f"{gate}.grads"] / case["upstream"]
            c = fd_check(gate, fn, ins, {"a": grads[0], "b": grads[1]})
            verdicts += [v for v in c.verdicts]
            for v in c.verdicts:
                v.name = f"{gate}.{v.name}"
        x = {"x": as_tensor(7.0, ctx)}
        c = fd_check("copy", lambda x: 4.0 * x + 2.0 * x, x, {"x": m["copy.grads"][0]})
        c.verdicts[0].name = "copy.x"
        verdicts += c.verdicts
        checks.append(Check("finite_differences", verdicts, ORACLE_FINITE_DIFFERENCES,
                            "local gradients (per unit upstream); max away from its tie"))
    return checks
