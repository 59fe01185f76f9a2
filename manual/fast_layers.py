"""FastMLP's optional layers: batch norm, layer norm, dropout and the embedding over the fast
step's buffers, each the readable pair of manual/norm.py, dropout.py and embedding.py op for op
(the same kernels on the same operands in the same order, so the same bits), written into
buffers allocated once with ``out=`` or in place.

Each takes its buffers at construction (one input signature: N rows, dtype, device, training
mode) and has ``forward`` and ``backward``; ``buffers()`` lists what it holds (peak-memory
accounting).  Layer norm's (N, W) backward temporary x̂ is a view of the plan's scratch that
FastMLP assigns to the attribute named by ``scratch``, in the part free while the norm's
backward runs; batch norm forms x − μ over x (``scratch`` None).  The backward writes d input over its d output argument where the readable one
returns a new tensor (the fast step never reads that d output again).
"""
import torch

from manual import _check
from manual.kernel_order import ChunkedColumnSums, LnRowSums, bn_dx_fma_columns
from manual.norm import eval_invstd, layernorm_dx_coefficients



class FastBatchNorm:
    """manual.norm.batchnorm_forward / batchnorm_backward of hidden layer i over buffers.

    h: the layer's linear output (N, W), which the forward normalizes into ``out`` (the
    activation then runs in place there) and the backward turns into x − μ.  grads: the step's
    gradient buffers, dweight and dbias are written there."""
    scratch = None   # x − μ is formed over x: the linear output is read by nothing else

    def __init__(self, mlp, i, h, grads):
        n, width = h.shape
        self.mlp, self.x, self.n = mlp, h, n
        self.weight, self.bias = mlp.params[f"norms.{i}.weight"], mlp.params[f"norms.{i}.bias"]
        self.running_mean = mlp.buffers[f"norms.{i}.running_mean"]
        self.running_var = mlp.buffers[f"norms.{i}.running_var"]
        self.tracked = mlp.buffers[f"norms.{i}.num_batches_tracked"]
        self.gw, self.gb = grads[f"norms.{i}.weight"], grads[f"norms.{i}.bias"]
        self.out = torch.empty_like(h)
        vec = lambda: h.new_empty(width)  # noqa: E731
        self.mean, self.invstd, self.dotp, self.k, self.grad_mean = (vec() for _ in range(5))
        self.unused = (h.new_empty(0), h.new_empty(0))   # eval: the kernel's empty save_*
        self.split = bn_dx_fma_columns(width, h.dtype, h.device)
        tail = (n, width - self.split)
        self.tails = (h.new_empty(tail), h.new_empty(tail)) if self.split < width else None
        self.sums = ChunkedColumnSums(n, width, h.dtype, h.device, torch.float64)

    def buffers(self):
        return [self.out, self.mean, self.invstd, self.dotp, self.k, self.grad_mean,
                self.sums.partials, self.sums.total, *(self.tails or ())]

    def forward(self, h):
        mlp = self.mlp
        if mlp.training:
            torch.native_batch_norm(h, self.weight, self.bias, self.running_mean,
                                    self.running_var, True, mlp.momentum, mlp.eps,
                                    out=(self.out, self.mean, self.invstd))
            self.tracked.add_(1)
        else:
            torch.native_batch_norm(h, self.weight, self.bias, self.running_mean,
                                    self.running_var, False, mlp.momentum, mlp.eps,
                                    out=(self.out, *self.unused))
            self.mean.copy_(self.running_mean)
            self.invstd.copy_(eval_invstd(self.running_var, mlp.eps, h.dtype))
        return self.out

    def backward(self, dout):
        """dx over dout; dweight, dbias into the gradient buffers (batchnorm_backward's ops)."""
        # dx = (w/σ)(dy − Σdy/N − (x−μ)·Σ(x−μ)dy/(Nσ²));  dweight = Σ(x−μ)dy/σ;  dbias = Σdy
        invstd, n = self.invstd, self.n
        xc = self.x.sub_(self.mean)                       # x − μ over x (h), its last reader
        sum_dy = self.sums.sum(dout, out=self.gb)                           # Σₙ dy = dbias
        dotp = self.sums.dot(xc, dout, out=self.dotp)                     # Σₙ (x − μ)·dy
        torch.mul(dotp, invstd, out=self.gw)
        if not self.mlp.training:
            return dout.mul_(invstd).mul_(self.weight)
        k = torch.mul(dotp, invstd, out=self.k).mul_(invstd).div_(n)
        grad_mean = torch.div(sum_dy, n, out=self.grad_mean)
        d = dout.sub_(grad_mean)                                            # dy − Σdy/N
        split = self.split
        if self.tails is not None:    # kernel_order.bn_dx_inner: the tail's two roundings
            product, plain = self.tails
            torch.mul(xc[:, split:], k[split:], out=product)
            torch.sub(d[:, split:], product, out=plain)
        d.addcmul_(xc, k, value=-1)                                         # one FMA
        if self.tails is not None:
            d[:, split:].copy_(self.tails[1])
        return d.mul_(invstd).mul_(self.weight)


class FastLayerNorm:
    """manual.norm.layernorm_forward / layernorm_backward of hidden layer i over buffers (the
    forward kernel's output copied into one; dweight, dbias with a ChunkedColumnSums plan made once; dx over
    d output, after the sums that read it)."""
    scratch = "xhat"   # the attribute FastMLP points at scratch

    def __init__(self, mlp, i, h, grads):
        n, width = h.shape
        self.mlp, self.x = mlp, h
        self.weight, self.bias = mlp.params[f"norms.{i}.weight"], mlp.params[f"norms.{i}.bias"]
        self.gw, self.gb = grads[f"norms.{i}.weight"], grads[f"norms.{i}.bias"]
        self.out, self.xhat = torch.empty_like(h), None   # xhat: the plan's
        self.mean, self.rstd, self.shift = None, None, h.new_empty((n, 1))   # μ, 1/σ: forward's
        self.sums = ChunkedColumnSums(n, width, h.dtype, h.device, h.dtype)
        self.row_sums = LnRowSums(n, width, h.dtype, h.device)

    def buffers(self):
        row_sums = [self.row_sums.acc, *sum(self.row_sums.folds, [])] if self.row_sums.full else []
        return [self.out, self.shift, self.sums.partials, self.sums.total, *row_sums]

    def forward(self, h):
        # torch.native_layer_norm has no out= form outside torch.ops (which manual/ may not
        # use): its output is copied into the buffer the activation runs in; μ, 1/σ kept
        out, self.mean, self.rstd = torch.native_layer_norm(h, [h.shape[1]], self.weight,
                                                            self.bias, self.mlp.eps)
        return self.out.copy_(out)

    def backward(self, dout):
        """dx over dout; dweight, dbias into the gradient buffers (layernorm_backward's ops)."""
        # dx = (1/σ)(w·dy − mean(w·dy) − x̂·mean(w·dy·x̂));  dweight = Σᵢ dy·x̂;  dbias = Σᵢ dy
        x, w, mu, rstd = self.x, self.weight, self.mean, self.rstd
        x_coef, const = layernorm_dx_coefficients(dout, x, w, mu, rstd, work=self.xhat,
                                                  plan=self.row_sums)
        # kernel_order.ln_param_grads: x̂ = fma(rstd, x, −rstd·μ), then the sums over the rows
        shift = torch.mul(rstd, mu, out=self.shift).neg_()
        xhat = torch.addcmul(shift, rstd, x, out=self.xhat)
        self.sums.dot(dout, xhat, out=self.gw)
        self.sums.sum(dout, out=self.gb)
        return dout.mul_(rstd).mul_(w).addcmul_(x_coef.expand_as(x), x).add_(const)


class FastDropout:
    """manual.dropout.dropout_forward / _backward in training mode with p > 0, over buffers:
    the same bernoulli_ and div_ on the MLP's generator (the same masks), out = x·mask."""

    def __init__(self, mlp, noise):
        """noise: a buffer shaped like the activation's output (N, H)."""
        self.mlp, self.keep = mlp, 1 - mlp.dropout
        self.noise, self.out = noise, torch.empty_like(noise)

    def buffers(self):
        return [self.noise, self.out]

    def forward(self, a):
        self.noise.bernoulli_(self.keep, generator=self.mlp.generator).div_(self.keep)
        return torch.mul(a, self.noise, out=self.out)

    def backward(self, dout):
        # out = x·m/(1−p)  ⇒  dx = dout·m/(1−p), over dout
        return dout.mul_(self.noise)


class FastEmbedding:
    """manual.embedding.embedding_forward / _backward over buffers: index_select into the
    flattened output (N, T·E), and the table's gradient as zeros + index_add_ in index order."""

    def __init__(self, mlp, n, grads):
        self.vocab, dim = mlp.params["embed.weight"].shape
        self.table, self.gw = mlp.params["embed.weight"], grads["embed.weight"]
        self.out = self.table.new_empty((n, mlp.embedding["context"] * dim))
        self.rows = self.out.view(-1, dim)      # (N·T, E)
        self.x, self.idx = None, None           # the tokens last looked up, flattened to int64

    def buffers(self):
        return [self.out]

    def forward(self, x):
        if _check.tokens(x, self.vocab) or x is not self.x:   # read (new or written since)
            self.x, self.idx = x, x.long().reshape(-1)
        torch.index_select(self.table, 0, self.idx, out=self.rows)
        return self.out

    def backward(self, dout):
        # out = W[idx]  ⇒  dW[v] = Σ_{i: idx_i = v} dout_i, accumulated in index order
        self.gw.zero_().index_add_(0, self.idx, dout.view(self.rows.shape))
