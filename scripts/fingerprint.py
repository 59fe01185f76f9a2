"""Fingerprint every manual result: a sha256 over the raw bytes of each forward output, gradient
and updated parameter, so a refactor of manual/ can show it changed no bit.

Groups: one MLP run per activation × loss × optimizer configuration (3 training steps, float32 and
float64: loss, output, gradients and parameters after each step), then the optional layers through
the MLP (batch norm train and eval, layer norm, dropout, embedding) and the norm ops alone (fused
and step-by-step batch-norm backward, layer norm; several widths, so every lane tail is hit).
One torch thread.  Prints one hash per group and a total; the same manual/ prints the same lines
on the same CPU capability and torch.  ``python scripts/fingerprint.py [--total]``
"""
import argparse
import hashlib
import sys

import torch

from manual import ACTIVATIONS, LOSSES, MLP, make_optimizer
from manual.losses import target_kind
from manual.mlp import init_params
from manual.norm import (batchnorm_backward, batchnorm_backward_steps, batchnorm_forward,
                         batchnorm_forward_steps, layernorm_backward, layernorm_forward)

DTYPES = (torch.float32, torch.float64)
OPTIMIZERS = {   # every setting manual/optim.py implements, each at least once
    "sgd": ("sgd", {"lr": 0.1}),
    "sgd_momentum": ("sgd", {"lr": 0.1, "momentum": 0.9}),
    "sgd_dampening_wd": ("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3,
                                 "weight_decay": 0.01}),
    "sgd_nesterov": ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "adam": ("adam", {"lr": 0.01}),
    "adam_wd_amsgrad": ("adam", {"lr": 0.01, "weight_decay": 0.01, "amsgrad": True}),
    "adamw": ("adamw", {"lr": 0.01}),
    "adamw_amsgrad": ("adamw", {"lr": 0.01, "betas": (0.8, 0.99), "amsgrad": True}),
}
N, D, H, C = 37, 5, 9, 4   # N > 16 and > 32: the nll cascade hands off at two levels


def _data(loss, dtype, seed, n=N, d=D):
    gen = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(n, d, generator=gen, dtype=torch.float64)).to(dtype)
    if target_kind(loss) == "labels":
        return x, torch.randint(0, C, (n,), generator=gen)
    return x, torch.randn(n, C, generator=gen, dtype=torch.float64).to(dtype)


def _feed(h, tensors):
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes() if t.dtype != torch.bfloat16
                 else t.view(torch.int16).numpy().tobytes())


def _train(h, model, x, target, steps=3):
    """forward, backward and step `steps` times, hashing every result on the way."""
    for _ in range(steps):
        trace = {}
        loss, cache = model.forward(x, target, trace)
        grads, dx = model.backward(cache, trace=trace)
        _feed(h, [loss, dx] + [trace[k] for k in sorted(trace)] + list(grads.values()))
        model.step(grads)
        _feed(h, list(model.params.values()) + list(model.buffers.values()))


def mlp_group(activation, loss, opt):
    h = hashlib.sha256()
    for dtype in DTYPES:
        params = init_params([D, H, H, C], activation, dtype=dtype, seed=1)
        name, settings = OPTIMIZERS[opt]
        model = MLP(params, activation, loss, make_optimizer(name, **settings),
                    reg=0.01 if opt == "sgd_momentum" else 0.0)
        _train(h, model, *_data(loss, dtype, 2))
    return h.hexdigest()


def layers_group(norm=None, dropout=0.0, embedding=None, evaluate=False):
    h = hashlib.sha256()
    for dtype in DTYPES:
        d = D if embedding is None else embedding["context"] * embedding["dim"]
        params = init_params([d, 12, 7, C], "tanh", dtype=dtype, seed=3, norm=norm,
                             embedding=embedding)
        model = MLP(params, "tanh", "cross_entropy", make_optimizer("adam", lr=0.01), norm=norm,
                    dropout=dropout, embedding=embedding,
                    generator=torch.Generator().manual_seed(4))
        x, target = _data("cross_entropy", dtype, 5)
        if embedding is not None:
            x = torch.randint(0, embedding["vocab"], (N, embedding["context"]),
                              generator=torch.Generator().manual_seed(6))
        _train(h, model, x, target)
        if evaluate:
            model.eval()
            _train(h, model, x, target)
    return h.hexdigest()


def norm_ops_group(kind):
    h = hashlib.sha256()
    for dtype in DTYPES:
        for n, d in ((2, 1), (3, 4), (5, 7), (17, 9), (33, 20), (64, 33), (100, 257)):
            gen = torch.Generator().manual_seed(n * 1000 + d)
            x, dy = (torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype) * 3 + 1
                     for _ in range(2))
            w, b, rm = (torch.randn(d, generator=gen, dtype=torch.float64).to(dtype)
                        for _ in range(3))
            rv = torch.rand(d, generator=gen, dtype=torch.float64).to(dtype) + 0.5
            if kind == "layernorm":
                out, cache = layernorm_forward(x, w, b)
                _feed(h, [out, *layernorm_backward(dy, cache)])
            elif kind == "batchnorm_steps":
                out, cache = batchnorm_forward_steps(x, w, b)
                _feed(h, [out, *batchnorm_backward_steps(dy, cache)])
            else:
                training = kind == "batchnorm_train"
                out, cache = batchnorm_forward(x, w, b, rm, rv, training=training)
                _feed(h, [out, rm, rv, *batchnorm_backward(dy, cache)])
    return h.hexdigest()


def groups():
    """(name, thunk) for every group, in a fixed order."""
    out = []
    for act in ACTIVATIONS:
        for loss in LOSSES:
            for opt in OPTIMIZERS:
                out.append((f"mlp {act} {loss} {opt}",
                            lambda a=act, lo=loss, o=opt: mlp_group(a, lo, o)))
    out += [("layers batchnorm train+eval", lambda: layers_group("batchnorm", evaluate=True)),
            ("layers layernorm", lambda: layers_group("layernorm")),
            ("layers dropout train+eval", lambda: layers_group(dropout=0.3, evaluate=True)),
            ("layers embedding", lambda: layers_group(embedding={"vocab": 11, "dim": 3,
                                                                 "context": 2})),
            ("layers batchnorm+dropout+embedding", lambda: layers_group(
                "batchnorm", 0.2, {"vocab": 7, "dim": 2, "context": 3}))]
    out += [(f"op {kind}", lambda k=kind: norm_ops_group(k))
            for kind in ("batchnorm_train", "batchnorm_eval", "batchnorm_steps", "layernorm")]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total", action="store_true", help="print the total hash only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    total = hashlib.sha256()
    for name, thunk in groups():
        digest = thunk()
        total.update(digest.encode())
        if not args.total:
            print(f"{digest[:16]}  {name}")
    print(f"{total.hexdigest()}  total ({torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
