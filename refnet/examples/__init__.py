"""The example registry: every example of the source document, by name.

An example is a function ``run(ctx) -> list[Check]`` registered with ``@register``.  Numbers from
the document appear once, in the example's module, and `verify/` reads them from there.
Modules of this package register their examples when imported (see _MODULES).
"""
from dataclasses import dataclass, field
import importlib

import torch

from refnet.compare import TIERS, Verdict


@dataclass
class Context:
    device: str = "cpu"
    dtype: torch.dtype = torch.float64
    strict_bits: bool = False

    @property
    def dtype_name(self):
        return str(self.dtype).replace("torch.", "")


@dataclass
class Check:
    """One named check of an example: the verdicts of every tensor it compared."""
    name: str
    verdicts: list
    oracle: str = "manual vs autograd"   # which two things were compared
    note: str = ""

    @property
    def tier(self):
        return max((v.tier for v in self.verdicts), key=TIERS.index, default="fail")

    @property
    def passed(self):
        return bool(self.verdicts) and all(v.passed for v in self.verdicts)

    def failures(self):
        return [v.message() for v in self.verdicts if not v.passed]


@dataclass
class Example:
    name: str
    title: str
    section: str
    run: object
    dtypes: tuple = ("float32", "float64")
    devices: tuple = ("cpu", "cuda")
    tags: tuple = field(default_factory=tuple)
    case: object = None   # optional case(dtype) -> refnet.golden.case_for_spec(...): exportable


REGISTRY = {}
_MODULES = ("seed", "scalar", "activations", "vectorized", "deep", "nonlinearity", "claims",
            "norm_layers")
_loaded = False


def register(name, title, section, dtypes=("float32", "float64"), devices=("cpu", "cuda"),
             case=None):
    def deco(fn):
        if name in REGISTRY:
            raise RuntimeError(f"example {name!r} registered twice")
        REGISTRY[name] = Example(name, title, section, fn, tuple(dtypes), tuple(devices), case=case)
        return fn
    return deco


def _load():
    global _loaded
    if not _loaded:
        for mod in _MODULES:
            importlib.import_module(f"refnet.examples.{mod}")
        _loaded = True


def all_examples():
    _load()
    return dict(REGISTRY)


def get(name):
    _load()
    if name not in REGISTRY:
        raise ValueError(f"--example: unknown name {name!r}; expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["Check", "Context", "Example", "Verdict", "all_examples", "get", "register"]
