"""Evaluation mode through the whole MLP: after eval(), the manual MLP's predict and forward give
the twin's outputs and loss bit for bit, for every norm and dropout spec, and neither side moves a
buffer (batch norm's running statistics, its batch count) or draws from its dropout stream.

The nets are trained a few lockstep steps first, so the running statistics are far from their
initial 0/1 and eval's normalisation by them differs from training's by the batch's own; each case
also checks that eval's output differs from training's where the layers make them differ, so a
manual MLP that ignored eval() would fail here."""
import pytest
import torch

from refnet.data import load_data
from refnet.harness import build_pair, train_lockstep
from refnet.spec import Spec

LAYERS = [{"norm": norm, "dropout": p} for norm in (None, "batchnorm", "layernorm")
          for p in (0.0, 0.3)]


def _buffers(pair):
    return ({k: t.clone() for k, t in pair.mlp.buffers.items()},
            {k: t.clone() for k, t in pair.twin.named_buffers()})


def _streams(pair):
    """The dropout streams' states, manual's and the twin's (None where a side has none)."""
    twin_gen = getattr(pair.twin, "generator", None)
    return (pair.mlp.generator.get_state(),
            twin_gen.get_state() if isinstance(twin_gen, torch.Generator) else None)


def _assert_same_state(before, after):
    for b, a in zip(before, after):
        assert set(b) == set(a)
        for name in b:
            assert torch.equal(b[name], a[name]), f"{name} moved in eval"


@pytest.mark.parametrize("layers", LAYERS, ids=lambda d: f"{d['norm']}-p{d['dropout']}")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_eval_outputs_and_buffers_match_the_twin(layers, dtype):
    spec = Spec(sizes=[2, 17, 9, 3], activation="relu", loss="cross_entropy", data="spiral",
                steps=4, batch_size=30, dtype=dtype, seed=5, optimizer={"name": "sgd", "lr": 0.3},
                **layers)
    pair = build_pair(spec)
    x, target = load_data(spec)
    train_lockstep(pair, x, target, 4, batch_size=30, seed=5)
    x_eval, t_eval = x[:41], target[:41]

    pair.mlp.eval()
    pair.twin.eval()
    buffers, streams = _buffers(pair), _streams(pair)

    out_m, _ = pair.mlp.predict(x_eval)
    loss_m, _ = pair.mlp.forward(x_eval, t_eval)
    with torch.no_grad():
        out_t = pair.twin(x_eval)
        loss_t = pair.twin_loss(out_t, t_eval)
    assert torch.equal(out_m, out_t)
    assert torch.equal(loss_m, loss_t)
    assert torch.equal(pair.mlp.predict(x_eval)[0], out_m)        # eval is deterministic

    _assert_same_state(buffers, _buffers(pair))
    for b, a in zip(streams, _streams(pair)):
        assert b is None or torch.equal(b, a), "eval drew from the dropout stream"
    for name, t in pair.twin.named_buffers():                       # and the two sides agree
        assert torch.equal(t, pair.mlp.buffers[name])
    if layers["norm"] == "batchnorm" or layers["dropout"]:       # eval differs from training
        assert not torch.equal(pair.mlp.train().predict(x_eval)[0], out_m)
