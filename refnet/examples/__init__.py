"""The example registry: every example of the source document, by name.

An example is a function ``run(ctx) -> list[refnet.compare.Check]`` registered with
``@register``.  Numbers from the document appear once, in the example's module, and `verify/` reads them from there.
Modules of this package register their examples when imported (see _MODULES).

One name, one net: an example that trains one MLP registers it as ``spec(dtype, device) -> Spec``
(with its own ``data`` and ``params`` where the document fixes them), and every verb builds that
same spec: `verify` runs it (and reports it), `train --example` trains it, `export` cuts its run
short.  Examples with ``section=None`` go beyond the document (training demos): `verify` runs
them only when named.
"""
from dataclasses import dataclass
import importlib

import torch

from refnet.data import load_data


@dataclass
class Context:
    device: str = "cpu"
    dtype: torch.dtype = torch.float64
    strict_bits: bool = False

    @property
    def dtype_name(self):
        return str(self.dtype).replace("torch.", "")


@dataclass
class Example:
    name: str
    title: str
    section: str
    run: object
    dtypes: tuple = ("float32", "float64")
    devices: tuple = ("cpu", "cuda")
    case: object = None     # optional case(dtype, steps) -> refnet.fixtures.case_for_spec(...)
    spec: object = None     # optional (dtype="float64", device="cpu") -> Spec: the example's net
    data: object = None     # optional (spec) -> (x, target): its data; None: refnet.data.load_data
    params: object = None   # optional (spec) -> initial params; None: the spec's seeded init
    export_default: bool = True  # case exported by a plain `refnet export` (False: --example only)

    def build_spec(self, dtype="float64", device="cpu"):
        """The example's one net on (dtype, device); ValueError when it trains no single MLP."""
        if self.spec is None:
            raise ValueError(f"--example: {self.name!r} trains no single MLP; examples that do: "
                             f"{', '.join(trainable())}")
        return self.spec(dtype, device)

    def training_data(self, spec):
        """(x, target) the example trains on: its own data set, else the spec's (load_data)."""
        return self.data(spec) if self.data is not None else load_data(spec)

    def initial_params(self, spec):
        """The parameters the example starts from, or None for the spec's seeded init."""
        return self.params(spec) if self.params is not None else None


REGISTRY = {}
_MODULES = ("seed", "scalar", "activations", "vectorized", "deep", "nonlinearity", "claims",
            "classifiers", "demos", "norm_layers")
_loaded = False


def register(name, title, section, dtypes=("float32", "float64"), devices=("cpu", "cuda"),
             case=None, spec=None, data=None, params=None, export_default=True):
    def deco(fn):
        if name in REGISTRY:
            raise RuntimeError(f"example {name!r} registered twice")
        REGISTRY[name] = Example(name, title, section, fn, tuple(dtypes), tuple(devices), case=case,
                                 spec=spec, data=data, params=params,
                                 export_default=export_default)
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


def document_examples():
    """The examples of the source document (the main job runs these)."""
    return {n: e for n, e in all_examples().items() if e.section is not None}


def trainable():
    """Names of the examples that train one MLP (accepted by `refnet train --example`)."""
    return [n for n, e in all_examples().items() if e.spec is not None]


def get(name):
    _load()
    if name not in REGISTRY:
        raise ValueError(f"--example: unknown name {name!r}; expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["Context", "Example", "all_examples", "document_examples", "get", "register",
           "trainable"]
