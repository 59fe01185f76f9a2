"""makemore's "backprop ninja" network as its chain of small ops, forward and backward by hand.

    emb = C[Xb]                         (N, T, E)      C (V, E)
    embcat = emb.view(N, T·E)
    hprebn = embcat @ W1 + b1           (N, H)         W1 (T·E, H), b1 (H,)
    bnmeani = 1/N · Σₙ hprebn
    bndiff = hprebn − bnmeani
    bndiff2 = bndiff²
    bnvar = 1/N · Σₙ bndiff2            (biased, as nn.BatchNorm1d normalizes in training;
                                         the exercise itself uses Bessel's 1/(N−1))
    bnvar_inv = (bnvar + eps)^(−1/2)
    bnraw = bndiff · bnvar_inv
    hpreact = bngain · bnraw + bnbias   bngain, bnbias (1, H)
    h = tanh(hpreact)
    logits = h @ W2 + b2                (N, V)         W2 (H, V), b2 (V,)
    logit_maxes = max_j logits;  norm_logits = logits − logit_maxes;  counts = exp(norm_logits)
    counts_sum = Σⱼ counts;  counts_sum_inv = counts_sum^(−1);  probs = counts · counts_sum_inv
    logprobs = log(probs);  loss = −mean_n logprobs[n, Yb[n]]

``chain_backward`` returns the gradient of every intermediate (``d`` + its name), each written as
the op autograd records for that line computes it (same operands, same order), so that each is
bit-identical to ``retain_grad`` on CPU.
"""
import torch

from manual.activations import tanh_backward

PARAM_NAMES = ("C", "W1", "b1", "bngain", "bnbias", "W2", "b2")


def chain_forward(params, Xb, Yb, eps=1e-5):
    """params: dict of PARAM_NAMES; Xb (N, T) int64; Yb (N,) int64 -> (loss, values dict)."""
    C, W1, b1 = params["C"], params["W1"], params["b1"]
    bngain, bnbias, W2, b2 = params["bngain"], params["bnbias"], params["W2"], params["b2"]
    n = Xb.shape[0]
    v = {}
    v["emb"] = C[Xb]
    v["embcat"] = v["emb"].view(n, -1)
    v["hprebn"] = v["embcat"] @ W1 + b1
    v["bnmeani"] = 1 / n * v["hprebn"].sum(0, keepdim=True)
    v["bndiff"] = v["hprebn"] - v["bnmeani"]
    v["bndiff2"] = v["bndiff"] ** 2
    v["bnvar"] = 1 / n * v["bndiff2"].sum(0, keepdim=True)
    v["bnvar_eps"] = v["bnvar"] + eps
    v["bnvar_inv"] = v["bnvar_eps"] ** -0.5
    v["bnraw"] = v["bndiff"] * v["bnvar_inv"]
    v["hpreact"] = bngain * v["bnraw"] + bnbias
    v["h"] = torch.tanh(v["hpreact"])
    v["logits"] = v["h"] @ W2 + b2
    maxes = v["logits"].max(1, keepdim=True)
    v["logit_maxes"], v["logit_argmax"] = maxes.values, maxes.indices
    v["norm_logits"] = v["logits"] - v["logit_maxes"]
    v["counts"] = v["norm_logits"].exp()
    v["counts_sum"] = v["counts"].sum(1, keepdims=True)
    v["counts_sum_inv"] = v["counts_sum"] ** -1
    v["probs"] = v["counts"] * v["counts_sum_inv"]
    v["logprobs"] = v["probs"].log()
    loss = -v["logprobs"][torch.arange(n), Yb].mean()
    v["Xb"], v["Yb"] = Xb, Yb
    return loss, v


def chain_backward(params, v):
    """Gradients of the loss w.r.t. every intermediate and parameter, from dlogprobs back to dC."""
    C, W1, bngain, W2 = params["C"], params["W1"], params["bngain"], params["W2"]
    Xb, Yb = v["Xb"], v["Yb"]
    n = Xb.shape[0]
    d = {}
    one = torch.ones((), dtype=W1.dtype, device=W1.device)
    # loss = −mean(logprobs[n, Yb]): Neg → Mean (÷N) → Index (scatter into zeros)
    d["logprobs"] = torch.zeros_like(v["logprobs"])
    d["logprobs"][torch.arange(n), Yb] = (-one).expand(n) / n
    d["probs"] = d["logprobs"] / v["probs"]                          # log' = 1/p
    d["counts_sum_inv"] = (d["probs"] * v["counts"]).sum(1, keepdim=True)   # broadcast: Σ over V
    dcounts = d["probs"] * v["counts_sum_inv"]
    d["counts_sum"] = d["counts_sum_inv"] * (-1 * v["counts_sum"].pow(-2))  # (x⁻¹)' = −x⁻²
    d["counts"] = dcounts + d["counts_sum"].expand_as(dcounts)       # second use: Σ → expand
    d["norm_logits"] = d["counts"] * v["counts"]                     # exp' = exp
    d["logit_maxes"] = (-d["norm_logits"]).sum(1, keepdim=True)      # x − m ⇒ dm = −Σ
    dmax = torch.zeros_like(v["logits"]).scatter_(1, v["logit_argmax"], d["logit_maxes"])
    d["logits"] = d["norm_logits"] + dmax                            # max(dim): the argmax gets it
    d["h"] = d["logits"].mm(W2.t())                                  # logits = h·W2 + b2
    d["W2"] = v["h"].t().mm(d["logits"])
    d["b2"] = d["logits"].sum(0)
    d["hpreact"] = tanh_backward(d["h"], v["h"])                     # tanh' = 1 − h²
    d["bngain"] = (d["hpreact"] * v["bnraw"]).sum(0, keepdim=True)   # hpreact = g·raw + b
    d["bnraw"] = d["hpreact"] * bngain
    d["bnbias"] = d["hpreact"].sum(0, keepdim=True)
    d["bnvar_inv"] = (d["bnraw"] * v["bndiff"]).sum(0, keepdim=True)  # raw = diff·inv
    dbndiff = d["bnraw"] * v["bnvar_inv"]
    d["bnvar"] = d["bnvar_inv"] * (-0.5 * v["bnvar_eps"].pow(-1.5))  # (v+ε)^(−½)' = −½(v+ε)^(−3/2)
    d["bndiff2"] = (d["bnvar"] * (1 / n)).expand_as(v["bndiff2"])    # var = 1/N·Σ diff2
    d["bndiff"] = dbndiff + d["bndiff2"] * (2 * v["bndiff"])         # (x²)' = 2x, second use
    d["bnmeani"] = (-d["bndiff"]).sum(0, keepdim=True)               # diff = pre − mean
    d["hprebn"] = d["bndiff"] + (d["bnmeani"] * (1 / n)).expand_as(v["hprebn"])  # mean = 1/N·Σ
    d["embcat"] = d["hprebn"].mm(W1.t())                             # hprebn = embcat·W1 + b1
    d["W1"] = v["embcat"].t().mm(d["hprebn"])
    d["b1"] = d["hprebn"].sum(0)
    d["emb"] = d["embcat"].view(v["emb"].shape)                      # view
    # emb = C[Xb]: index_put_(accumulate) into zeros, rows added in index order
    d["C"] = torch.zeros_like(C).index_put_((Xb,), d["emb"], accumulate=True)
    return d
