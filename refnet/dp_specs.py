"""The specs `refnet verify --nproc N` checks without --spec (small enough for CI).

The document's net (smaller), a deep ReLU net with biases, a cross-entropy + Adam net; and
bn_dp_spec, batch norm and dropout data-parallel (refnet.dp_pair.DPPair.sync_buffers mirrors
DDP's broadcast of rank 0's buffers; each rank draws its own dropout stream).
"""
from refnet.spec import Spec


def dp_specs(dtype="float64", device="cpu", steps=6):
    return [
        Spec(sizes=[64, 100, 10], activation="sigmoid", bias=False, loss="sum_squared",
             init="randn", data="random", n_samples=24, optimizer={"name": "sgd", "lr": 1e-4},
             steps=steps, dtype=dtype, device=device, name="dp_document_net"),
        Spec(sizes=[8, 32, 32, 32, 4], activation="relu", loss="mse", data="random", n_samples=48,
             batch_size=24, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}, steps=steps,
             dtype=dtype, device=device, name="dp_deep_relu"),
        Spec(sizes=[2, 32, 3], activation="tanh", loss="cross_entropy", data="spiral",
             n_samples=60, batch_size=12, optimizer={"name": "adam", "lr": 0.01}, steps=steps,
             dtype=dtype, device=device, name="dp_ce_adam"),
    ]


def bn_dp_spec(dtype="float64", device="cpu", steps=6):
    """Batch norm (per-rank statistics, rank 0's running statistics broadcast each step) and,
    on the CPU, dropout (each rank's own stream), data-parallel."""
    return Spec(sizes=[2, 16, 16, 3], activation="relu", loss="cross_entropy", data="spiral",
                n_samples=48, batch_size=24, norm="batchnorm", dropout=0.2 if device == "cpu" else 0.0,
                optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, steps=steps, dtype=dtype,
                device=device, name="dp_batchnorm_dropout")
