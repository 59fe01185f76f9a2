"""The document's numpy program (section 6), corrected, as an independent oracle.  numpy only.

Errata fixed against the source text: full-width commas (，) in the argument lists replaced by
ASCII commas; ``range( 2000)`` spacing; ``from numpy .random import randn`` written as
``from numpy.random import randn``.  The random draws are passed in (rather than drawn with numpy's
global RNG) so that all three implementations start from the same data and weights.
"""
import numpy as np


def train(x, y, w1, w2, steps=2000, lr=1e-4):
    """x (N, D_in), y (N, D_out), w1 (D_in, H), w2 (H, D_out) -> (losses (steps,), w1, w2).

    The loop body is the document's, line for line (loss printing replaced by recording).
    """
    w1, w2 = w1.copy(), w2.copy()
    losses = np.empty(steps, dtype=x.dtype)
    for t in range(steps):
        h = 1 / (1 + np.exp(-x.dot(w1)))
        y_pred = h.dot(w2)
        loss = np.square(y_pred - y).sum()
        losses[t] = loss

        grad_y_pred = 2.0 * (y_pred - y)
        grad_w2 = h.T.dot(grad_y_pred)
        grad_h = grad_y_pred.dot(w2.T)
        grad_w1 = x.T.dot(grad_h * h * (1 - h))

        w1 -= lr * grad_w1
        w2 -= lr * grad_w2
    return losses, w1, w2
