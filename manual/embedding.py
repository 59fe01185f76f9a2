"""Embedding table lookup (nn.Embedding), a forward/backward pair.

Shapes: idx (N, T) int64 in [0, V); weight (V, E); out (N, T, E) (the MLP flattens it to (N, T·E)).

out[n, t] = weight[idx[n, t]]
dweight[v] = Σ_{(n,t): idx[n,t] = v} dout[n, t]     (zero rows for unused v)

The sum for a repeated index is accumulated in the order of the CPU kernel,
embedding_dense_backward_cpu (aten/src/ATen/native/Embedding.cpp): grad_weight starts as zeros and
for i = 0 … N·T − 1, in row-major order of idx, ``grad_weight[idx_i] += grad[i]`` (add_stub).  It
parallelises over the *rows of the table* (parallel_for over V with grain 1000), never over i, so
each row's sum is the sequential one whatever the thread count.  ``index_add_`` on the CPU walks
the indices in the same order with the same add, so it gives those bits.
"""
import torch

from manual import _check
from manual.cache import Cache


class EmbeddingCache(Cache):
    """What embedding_backward needs: the indices (N, T) int64 and the table's shape (V, E)."""
    fields = ("idx", "weight_shape")
    __slots__ = fields


def embedding_forward(idx, weight):
    """idx (N, T) integer, weight (V, E) -> (out (N, T, E), cache)."""
    _check.tensor("embedding.weight", weight, ndim=2)
    _check.token_indices(idx, weight.shape[0])
    if idx.device != weight.device:
        raise ValueError(f"x: expected device {weight.device} to match embedding.weight, "
                         f"got {idx.device}")
    idx = idx.long()
    out = weight.index_select(0, idx.reshape(-1)).view(*idx.shape, weight.shape[1])
    return out, EmbeddingCache(idx, weight.shape)


def embedding_backward(dout, cache):
    """dout (N, T, E) -> dweight (V, E)."""
    # out = W[idx]  ⇒  dW[v] = Σ_{i: idx_i = v} dout_i, accumulated in index order
    idx, weight_shape = cache
    if dout.shape != (*idx.shape, weight_shape[1]):
        raise ValueError(f"dout: expected shape {[*idx.shape, weight_shape[1]]}, "
                         f"got {list(dout.shape)}")
    dweight = torch.zeros(weight_shape, dtype=dout.dtype, device=dout.device)
    return dweight.index_add_(0, idx.reshape(-1), dout.reshape(-1, weight_shape[1]))
