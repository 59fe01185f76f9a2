"""Faults for the data-parallel tests, injected through the one test hook of a data-parallel job
(refnet.dp_pair.test_hook: job["test_hook"], called on every rank).  The hooks are pickled by
reference into the spawned ranks, which import this module by name (the repository root is on
sys.path: pyproject's pytest `pythonpath`)."""
import os
import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class _AtStep:
    """A fault on rank `rank` once it has trained step `step` (fire: what happens then)."""
    rank: int
    step: int

    def __call__(self, event, rank, value):
        if event == "step" and (rank, value) == (self.rank, self.step):
            self.fire(value)
        return value


class KillAt(_AtStep):
    """Rank `rank` is killed (SIGKILL) once it has trained step `step`."""

    def fire(self, step):
        os.kill(os.getpid(), signal.SIGKILL)


class RaiseAt(_AtStep):
    """Rank `rank` raises once it has trained step `step`."""

    def fire(self, step):
        raise RuntimeError(f"injected failure at step {step}")


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
