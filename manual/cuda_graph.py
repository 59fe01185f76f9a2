"""A FastMLP training step captured once as a CUDA graph and replayed (``CudaGraphStep``).

Only what a graph can replay unchanged is captured: the specialised step (manual/fast.py) with
in-place activations, a regression loss (the label losses read the labels on the host) and exactly
manual.optim.SGD (Adam/AdamW keep their step count and bias corrections as Python numbers, which a
graph would freeze).  A captured graph bakes in the tensors it reads and writes and the settings
it was recorded with; every replay checks they are unchanged and refuses a stale graph.

This module does not import manual.fast (manual.fast re-exports these names): a FastMLP is
recognised by what the capture uses of it (``specialised``, ``mlp``, ``train_step``, ``reset``).
"""
import torch

from manual.fast_activations import IN_PLACE_ACTIVATIONS
from manual.fast_optim import optimizer_kind


def graph_state(fast):
    """What a captured graph bakes in: the tensors it reads and writes (by identity) and the
    settings it was recorded with.  A change to any of them makes the graph stale."""
    mlp, opt = fast.mlp, fast.mlp.optimizer
    return (tuple((name, id(t)) for name, t in mlp.params.items()),
            tuple((name, id(t)) for name, t in getattr(opt, "buffers", {}).items()),
            id(opt), tuple(sorted((k, v) for k, v in vars(opt).items() if k != "buffers")),
            mlp.loss, mlp.reg, tuple(mlp.activations))


def check_graphable(fast):
    """Raise a one-line ValueError unless CudaGraphStep can capture this FastMLP's step.

    Only the specialised step with exactly manual.optim.SGD is captured: its update reads only
    tensors and hyper-parameters fixed at capture.  Adam/AdamW keep the step count and the bias
    corrections as Python numbers that a graph would freeze at their capture-time values (every
    replay would reuse step t), so they are refused rather than replayed wrong."""
    if not all(hasattr(fast, a) for a in ("specialised", "mlp", "train_step", "reset")):
        raise TypeError(f"fast: expected a manual.fast.FastMLP, got {type(fast).__name__}")
    mlp = fast.mlp
    if not fast.specialised or mlp.loss not in ("sum_squared", "mse") \
            or any(a not in IN_PLACE_ACTIVATIONS for a in mlp.activations):
        raise ValueError("fast: graph capture needs a specialised FastMLP with sigmoid/tanh/relu/"
                         "identity activations and a sum_squared/mse loss (the label losses read "
                         "the labels on the host)")
    opt = fast.mlp.optimizer
    if optimizer_kind(opt) != "sgd":
        raise ValueError(f"optimizer: graph capture supports manual.optim.SGD only, got "
                         f"{type(opt).__name__} (its step count would be frozen in the graph)")


class CudaGraphStep:
    """A FastMLP training step captured once as a CUDA graph and replayed.

    x, target: example tensors fixing the shapes (copied into static buffers on every call).
    Only SGD (with or without momentum, Nesterov, weight decay) is captured; anything else is
    refused at construction (check_graphable).  The optimizer's hyper-parameters are baked in at
    capture.  With momentum the first step runs uncaptured (it creates the momentum buffers), so
    the captured graph has one control flow.  The warm-up the capture needs runs on a side stream
    and its effect on the parameters and the momentum buffers is undone before capture.

    After capture, every step checks that the parameters, the momentum buffers, the optimizer and
    its settings are the ones captured (optimizer.load_state_dict, a swapped parameter tensor or a
    new lr make the graph stale) and refuses to replay a stale graph; ``reset()`` drops the graph
    so the next step captures again.
    """

    def __init__(self, fast, x, target, warmup=3):
        check_graphable(fast)
        if x.device.type != "cuda":
            raise ValueError(f"x: expected a CUDA tensor for graph capture, got device {x.device}")
        self.fast = fast
        self.static_x = x.detach().clone()
        self.static_target = target.detach().clone()
        self.warmup = warmup
        self.reset()

    def reset(self):
        """Drop the captured graph (and the FastMLP's plan); the next step captures again."""
        self.graph = None
        self.static_loss = None
        self._state = None
        self.fast.reset()

    def _needs_eager_first_step(self):
        opt = self.fast.mlp.optimizer
        return opt.momentum != 0 and not opt.buffers

    def _capture(self):
        fast, params = self.fast, self.fast.mlp.params
        opt = fast.mlp.optimizer
        saved = {name: t.clone() for name, t in params.items()}
        saved_bufs = {name: t.clone() for name, t in opt.buffers.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fast.train_step(self.static_x, self.static_target)
        torch.cuda.current_stream().wait_stream(side)
        for name, t in params.items():
            t.copy_(saved[name])
        for name, t in opt.buffers.items():
            t.copy_(saved_bufs[name])
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = fast.train_step(self.static_x, self.static_target)
        self._state = graph_state(fast)

    def train_step(self, x, target):
        """Same contract as FastMLP.train_step; the loss is a fresh copy of the static one."""
        if self.graph is None:
            check_graphable(self.fast)
            if self._needs_eager_first_step():
                return self.fast.train_step(x, target)
            self._capture()
        elif graph_state(self.fast) != self._state:
            raise ValueError("CudaGraphStep: the parameters, optimizer state or settings changed "
                             "since capture (load_state_dict, a replaced tensor, a new lr); call "
                             "reset() to capture again")
        if x.shape != self.static_x.shape or target.shape != self.static_target.shape:
            raise ValueError(f"x: expected the captured shapes {list(self.static_x.shape)} and "
                             f"{list(self.static_target.shape)}, got {list(x.shape)} and "
                             f"{list(target.shape)}")
        self.static_x.copy_(x)
        self.static_target.copy_(target)
        self.graph.replay()
        return self.static_loss.clone()
