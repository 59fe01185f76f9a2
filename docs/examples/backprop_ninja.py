"""makemore part 4, "becoming a backprop ninja": the chain backpropagated by hand, checked with
`refnet.trace_compare` instead of 26 `cmp` lines.

embedding -> linear -> batchnorm -> tanh -> linear -> cross-entropy, every step its own tensor
(karpathy/nn-zero-to-hero, lecture 5).  `trace_compare` grades every manual gradient against
autograd's in backward order and names the FIRST that departs; the ones after it inherit the
error, so the first is where to look.

Run it:  pytest docs/examples/backprop_ninja.py     (tests/test_docs_examples.py runs it too)
Sizes (small; data generated here): vocabulary V, context T, embedding E, hidden H, batch N.
"""
import torch
import torch.nn.functional as F

import refnet

V, T, E, H, N = 11, 3, 5, 16, 8


def make_problem(seed=0):
    """Parameters initialised away from 0/1 on purpose (an all-zero bias hides a wrong backward)."""
    g = torch.Generator().manual_seed(seed)
    p = {
        "C": torch.randn(V, E, generator=g),
        "W1": torch.randn(T * E, H, generator=g) * (5 / 3) / (T * E) ** 0.5,
        "b1": torch.randn(H, generator=g) * 0.1,
        "W2": torch.randn(H, V, generator=g) * 0.1,
        "b2": torch.randn(V, generator=g) * 0.1,
        "bngain": torch.randn(1, H, generator=g) * 0.1 + 1.0,
        "bnbias": torch.randn(1, H, generator=g) * 0.1,
    }
    Xb = torch.randint(0, V, (N, T), generator=g)     # (N, T) context indices
    Yb = torch.randint(0, V, (N,), generator=g)       # (N,) next-character labels
    return p, Xb, Yb


def forward(p, Xb, Yb):
    """The lecture's forward, cut into steps; every intermediate kept (and its .grad retained)."""
    f = {}
    f["emb"] = p["C"][Xb]                                        # (N, T, E)
    f["embcat"] = f["emb"].view(N, -1)                           # (N, T·E)
    f["hprebn"] = f["embcat"] @ p["W1"] + p["b1"]                # (N, H)
    f["bnmeani"] = 1 / N * f["hprebn"].sum(0, keepdim=True)      # (1, H)
    f["bndiff"] = f["hprebn"] - f["bnmeani"]
    f["bndiff2"] = f["bndiff"] ** 2
    f["bnvar"] = 1 / (N - 1) * f["bndiff2"].sum(0, keepdim=True)  # Bessel's correction
    f["bnvar_inv"] = (f["bnvar"] + 1e-5) ** -0.5
    f["bnraw"] = f["bndiff"] * f["bnvar_inv"]
    f["hpreact"] = p["bngain"] * f["bnraw"] + p["bnbias"]
    f["h"] = torch.tanh(f["hpreact"])
    f["logits"] = f["h"] @ p["W2"] + p["b2"]                     # (N, V)
    f["logit_maxes"] = f["logits"].max(1, keepdim=True).values
    f["norm_logits"] = f["logits"] - f["logit_maxes"]
    f["counts"] = f["norm_logits"].exp()
    f["counts_sum"] = f["counts"].sum(1, keepdim=True)
    f["counts_sum_inv"] = f["counts_sum"] ** -1   # the lecture: **-1, not 1.0/x, keeps it exact
    f["probs"] = f["counts"] * f["counts_sum_inv"]
    f["logprobs"] = f["probs"].log()
    f["loss"] = -f["logprobs"][range(N), Yb].mean()
    return f


def reference_grads(p, Xb, Yb):
    """Autograd's gradient of the loss for every parameter and intermediate, named d + name."""
    p = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    f = forward(p, Xb, Yb)
    for t in f.values():
        t.retain_grad()
    f["loss"].backward()
    return {"d" + k: t.grad for k, t in {**f, **p}.items() if t.grad is not None}, f


def manual_backward(p, f, Xb, Yb, broken=None):
    """The backward pass by hand, in backward order.  broken: a step to get wrong on purpose."""
    f = {k: v.detach() for k, v in f.items()}
    d = {}
    dlogprobs = torch.zeros_like(f["logprobs"])
    dlogprobs[range(N), Yb] = -1.0 / N                  # loss = −mean of the picked logprobs
    d["dlogprobs"] = dlogprobs
    d["dprobs"] = (1.0 / f["probs"]) * dlogprobs        # log'(x) = 1/x
    d["dcounts_sum_inv"] = (f["counts"] * d["dprobs"]).sum(1, keepdim=True)
    dcounts = f["counts_sum_inv"] * d["dprobs"]
    d["dcounts_sum"] = (-f["counts_sum"] ** -2) * d["dcounts_sum_inv"]   # (x⁻¹)' = −x⁻²
    d["dcounts"] = dcounts + torch.ones_like(f["counts"]) * d["dcounts_sum"]
    d["dnorm_logits"] = f["counts"] * d["dcounts"]      # exp' = exp
    d["dlogit_maxes"] = (-d["dnorm_logits"]).sum(1, keepdim=True)
    d["dlogits"] = d["dnorm_logits"].clone() + F.one_hot(
        f["logits"].max(1).indices, num_classes=V) * d["dlogit_maxes"]
    d["dh"] = d["dlogits"] @ p["W2"].T
    d["dW2"] = f["h"].T @ d["dlogits"]
    d["db2"] = d["dlogits"].sum(0)
    d["dhpreact"] = (1.0 - f["h"] ** 2) * d["dh"]       # tanh' = 1 − tanh²
    d["dbngain"] = (f["bnraw"] * d["dhpreact"]).sum(0, keepdim=True)
    d["dbnbias"] = d["dhpreact"].sum(0, keepdim=True)   # (1, H) like bnbias: keepdim matters
    d["dbnraw"] = p["bngain"] * d["dhpreact"]
    d["dbnvar_inv"] = (f["bndiff"] * d["dbnraw"]).sum(0, keepdim=True)
    scale = 0.5 if broken == "dbnvar" else -0.5         # the deliberate mistake: a lost sign
    d["dbnvar"] = (scale * (f["bnvar"] + 1e-5) ** -1.5) * d["dbnvar_inv"]   # (v^−½)' = −½v^−3/2
    d["dbndiff2"] = (1.0 / (N - 1)) * torch.ones_like(f["bndiff2"]) * d["dbnvar"]
    d["dbndiff"] = f["bnvar_inv"] * d["dbnraw"] + (2 * f["bndiff"]) * d["dbndiff2"]
    d["dbnmeani"] = (-d["dbndiff"]).sum(0, keepdim=True)
    d["dhprebn"] = d["dbndiff"].clone() + 1.0 / N * (torch.ones_like(f["hprebn"]) * d["dbnmeani"])
    d["dembcat"] = d["dhprebn"] @ p["W1"].T
    d["dW1"] = f["embcat"].T @ d["dhprebn"]
    d["db1"] = d["dhprebn"].sum(0)
    d["demb"] = d["dembcat"].view(f["emb"].shape)
    dC = torch.zeros_like(p["C"])
    dC.index_add_(0, Xb.view(-1), d["demb"].view(-1, E))   # each row used, each row's gradient
    d["dC"] = dC
    return d


def test_every_step_matches_autograd(refnet_check):
    p, Xb, Yb = make_problem()
    reference, f = reference_grads(p, Xb, Yb)
    manual = manual_backward(p, f, Xb, Yb)
    # db1 is mathematically zero (b1 feeds batch norm, which subtracts the batch mean): both
    # sides are rounding noise of dhprebn's sum, so it is graded at dhprebn's size, not its own
    trace = refnet_check.trace_compare(manual, reference, tier="tolerance",
                                       scale={"db1": manual["dhprebn"]})
    print(trace)
    assert len(trace.verdicts) == 26 and trace.first_departure is None


def test_a_broken_step_is_named_as_the_first_departure():
    p, Xb, Yb = make_problem()
    reference, f = reference_grads(p, Xb, Yb)
    trace = refnet.trace_compare(manual_backward(p, f, Xb, Yb, broken="dbnvar"), reference)
    print(trace)
    assert trace.first_departure == "dbnvar"
    names = [v.name for v in trace.verdicts]
    before = names[:names.index("dbnvar")]
    assert all(trace[n].passed for n in before)            # everything upstream still agrees
    assert {"dbndiff", "dhprebn", "dW1", "dC"} <= {v.name for v in trace.after if not v.passed}
    text = str(trace)
    assert "first departure at #" in text and "'dbnvar'" in text and "worst at index" in text


def test_a_dropped_keepdim_is_a_shape_failure_not_a_broadcast():
    # The reported complaint: dbnbias as (H,) passed `cmp` against bnbias.grad (1, H).
    p, Xb, Yb = make_problem()
    reference, f = reference_grads(p, Xb, Yb)
    manual = manual_backward(p, f, Xb, Yb)
    manual["dbnbias"] = manual["dbnbias"].view(-1)
    trace = refnet.trace_compare(manual, reference, scale={"db1": manual["dhprebn"]})
    assert trace.first_departure == "dbnbias" and trace.first_value_departure is None
    assert "shape [16] vs [1, 16]" in trace["dbnbias"].note


def test_a_shape_departure_does_not_hide_a_later_wrong_value():
    # the makemore chain: a keepdim difference at dbnmeani, and a wrong dC after it
    p, Xb, Yb = make_problem()
    reference, f = reference_grads(p, Xb, Yb)
    manual = manual_backward(p, f, Xb, Yb)
    manual["dbnmeani"] = manual["dbnmeani"].view(-1)
    manual["dC"] = manual["dC"] * 2
    trace = refnet.trace_compare(manual, reference, scale={"db1": manual["dhprebn"]})
    assert trace.first_departure == "dbnmeani" and trace.first_value_departure == "dC"
    assert "first value departure: 'dC'" in str(trace) and "refnet: dC is 'fail'" in str(trace)
