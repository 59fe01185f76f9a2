"""Labels are range-checked once per labels tensor, not every step (on CUDA the check is a sync).

manual._check.labels reads min and max of the labels (a device-to-host copy: a sync on CUDA) the
first time it sees a labels tensor and remembers it with its in-place version; later steps on the
same, unchanged tensor read nothing from the device.  Shown on the CPU by recording every
host read (aten._local_scalar_dense, .tolist(), .item(), int()/float()/bool() of a tensor).
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import manual
from manual.fast import FastMLP
from manual.mlp import MLP, init_params

HOST_READS = {"tolist", "item", "__int__", "__float__", "__bool__", "__index__"}


class HostReads(TorchFunctionMode):
    """Records every read of tensor values into Python, at both levels."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self._dispatch = _LocalScalars(self.calls)

    def __enter__(self):
        self._dispatch.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._dispatch.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


class _LocalScalars(TorchDispatchMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("aten::_local_scalar_dense"):
            self.calls.append(func.name())
        return func(*args, **(kwargs or {}))


def _net(loss, opt="sgd"):
    return MLP(init_params([4, 5, 3]), "tanh", loss, manual.make_optimizer(opt, lr=0.1))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(8, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g))


@pytest.mark.parametrize("fast", [False, True], ids=["readable", "fast"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("loss", ["cross_entropy", "svm"])
def test_train_step_on_validated_labels_reads_nothing_from_the_device(loss, opt, fast):
    x, labels = _data()
    net = _net(loss, opt)
    step = FastMLP(net).train_step if fast else net.train_step
    with HostReads() as first:
        step(x, labels)
    assert first.calls, "the first step must check the labels (the recorder sees nothing?)"
    for _ in range(3):
        with HostReads() as later:
            step(x, labels)
        assert later.calls == [], f"a step on validated labels read {later.calls}"


def test_bad_labels_still_fail_with_one_line():
    x, labels = _data()
    net = _net("cross_entropy")
    net.train_step(x, labels)
    bad = labels.clone()
    bad[3] = 7                                   # a new tensor: checked
    with pytest.raises(ValueError, match=r"^target: expected labels in \[0, 2\], got \[\d, 7\]$"):
        net.train_step(x, bad)
    labels[5] = -1                               # the validated tensor, written in place: checked
    with pytest.raises(ValueError, match=r"^target: expected labels in \[0, 2\], got \[-1, 2\]$"):
        net.train_step(x, labels)
    labels[5] = 1
    net.train_step(x, labels)


def test_a_validated_tensor_is_checked_again_for_fewer_classes():
    x, labels = _data()
    labels[0] = 2
    manual.loss_forward("svm", torch.zeros(8, 3, dtype=torch.float64), labels)
    with pytest.raises(ValueError, match=r"expected labels in \[0, 1\]"):
        manual.loss_forward("svm", torch.zeros(8, 2, dtype=torch.float64), labels)


def test_minibatch_training_reads_the_labels_once_per_data_set():
    """refnet.harness.train_lockstep checks the whole label set once and declares each mini-batch
    (a subset) checked: the manual side reads nothing from the device per step."""
    from refnet import harness
    from refnet.data import load_data
    from refnet.spec import Spec
    spec = Spec.from_dict({"sizes": [2, 6, 3], "activation": "relu", "loss": "cross_entropy",
                           "data": "spiral", "n_samples": 60, "batch_size": 16, "steps": 12,
                           "optimizer": {"name": "sgd", "lr": 0.1}})
    x, target = load_data(spec)
    pair = harness.build_pair(spec)
    manual_reads, steps = [], []

    def recorded(method, count=False):
        real = getattr(pair.mlp, method)

        def run(*args, **kwargs):
            if count:
                steps.append(1)
            with HostReads() as reads:
                out = real(*args, **kwargs)
            manual_reads.extend(reads.calls)
            return out
        setattr(pair.mlp, method, run)

    # the manual side of harness.lockstep_step: forward, backward, update
    recorded("forward", count=True)
    recorded("backward")
    recorded("step")
    harness.train_lockstep(pair, x, target, spec.steps, spec.batch_size, spec.seed)
    assert len(steps) == spec.steps            # every step went through the recorder
    assert manual_reads == [], manual_reads


def test_labels_checked_is_what_skips_the_read():
    """Without the declaration every new mini-batch tensor is read again (the test above can fail)."""
    x, y = _data()
    net = _net("cross_entropy")
    manual.losses.check_labels(y, 3)
    with HostReads() as reads:
        net.train_step(x[:4], y[:4])
    assert reads.calls
    batch = y[4:]
    manual.losses.labels_checked(batch, 3)
    with HostReads() as reads:
        net.train_step(x[4:], batch)
    assert reads.calls == []
