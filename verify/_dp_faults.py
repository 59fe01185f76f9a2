"""Faults for the data-parallel tests, injected through the one test hook of a data-parallel job
(refnet.dp_pair.test_hook: job["test_hook"], called on every rank).  The hooks are pickled by
reference into the spawned ranks, which import this module by name (the repository root is on
sys.path: pyproject's pytest `pythonpath`)."""
import os
import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class KillAt:
    """Rank `rank` is killed (SIGKILL) once it has trained step `step`."""
    rank: int
    step: int

    def __call__(self, event, rank, value):
        if event == "step" and (rank, value) == (self.rank, self.step):
            os.kill(os.getpid(), signal.SIGKILL)
        return value


@dataclass(frozen=True)
class RaiseAt:
    """Rank `rank` raises once it has trained step `step`."""
    rank: int
    step: int

    def __call__(self, event, rank, value):
        if event == "step" and (rank, value) == (self.rank, self.step):
            raise RuntimeError(f"injected failure at step {value}")
        return value


@dataclass(frozen=True)
class PerturbData:
    """Rank `rank`'s data differs from the others' in one element."""
    rank: int

    def __call__(self, event, rank, value):
        if event == "data" and rank == self.rank:
            x, target = value
            x = x.clone()
            x.view(-1)[0] += 1
            return x, target
        return value
