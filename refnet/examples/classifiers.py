"""Section 8's classifier losses, trained: a softmax (cross-entropy) classifier and a multiclass
SVM classifier on the three-class spiral, each with two optimizers, so that the main job runs
every loss and every optimizer of manual/ at least once (mse, sum_squared: the other examples;
cross-entropy and SVM: here; SGD with momentum + dampening and with Nesterov; Adam with L2 weight
decay; AdamW with amsgrad; the L2 loss term `reg`).

Each net: gradients at init on a full batch (more than 32 rows, so the nll_loss summation cascade
folds at every level it has), then a mini-batch training run (a fresh permutation per epoch),
comparing the loss curve and the final parameters, manual vs autograd.
"""
from refnet.data import load_data
from refnet.examples import register
from refnet.harness import twin_checks
from refnet.spec import Spec

N_SAMPLES, BATCH, STEPS = 150, 50, 120     # 3 epochs of 3 batches: the permutation changes
SIZES = [2, 24, 3]

NETS = {
    "softmax_classifier": {
        "adam": {"loss": "cross_entropy", "activation": "relu", "reg": 1e-3,
                 "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 1e-4}},
        "adamw_amsgrad": {"loss": "cross_entropy", "activation": "tanh",
                          "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.05,
                                        "amsgrad": True}},
    },
    "svm_classifier": {
        "sgd_nesterov": {"loss": "svm", "activation": "relu", "reg": 1e-3,
                         "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9,
                                       "nesterov": True, "weight_decay": 1e-4}},
        "sgd_dampening": {"loss": "svm", "activation": "leaky_relu",
                          "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.8,
                                        "dampening": 0.3}},
    },
}


def net_spec(example, net, dtype="float64", device="cpu"):
    s = NETS[example][net]
    return Spec(sizes=SIZES, activation=s["activation"], loss=s["loss"], data="spiral",
                n_samples=N_SAMPLES, batch_size=BATCH, steps=STEPS, optimizer=s["optimizer"],
                reg=s.get("reg", 0.0), dtype=dtype, device=device, seed=5,
                name=f"{example}_{net}")


def _run(example, ctx):
    checks = []
    for net in NETS[example]:
        spec = net_spec(example, net, ctx.dtype_name, ctx.device)
        x, target = load_data(spec)
        checks += twin_checks(spec, x, target, ctx.strict_bits, prefix=f"{net}.")
    return checks


def _first_spec(example):
    net = next(iter(NETS[example]))
    return lambda dtype="float64", device="cpu": net_spec(example, net, dtype, device)


@register("softmax_classifier", "softmax cross-entropy on the spiral: Adam (L2 decay, reg), "
          "AdamW with amsgrad", "8", spec=_first_spec("softmax_classifier"))
def run_softmax(ctx):
    return _run("softmax_classifier", ctx)


@register("svm_classifier", "multiclass SVM loss on the spiral: SGD with Nesterov momentum, "
          "SGD with momentum and dampening", "8", spec=_first_spec("svm_classifier"))
def run_svm(ctx):
    return _run("svm_classifier", ctx)
