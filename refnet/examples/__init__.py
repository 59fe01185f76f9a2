"""The example registry: every example of the source document, by name.

An example is a function ``run(ctx) -> list[refnet.compare.Check]`` declared with ``@register``,
which records an `Example`: the example's typed declaration (name, title, section, run, and the
optional hooks below).  Numbers from the document appear once, in the example's module, and
`verify/` reads them from there.  Modules of this package declare their examples when imported;
_MODULES lists them in the order the main job reports them (tests/test_examples.py checks that it
names every module of the package, so a new module cannot be left out).

One name, one net: an example that trains one MLP declares it as ``spec(dtype, device) -> Spec``
(with its own ``data`` and ``params`` where the document fixes them), and every verb builds that
same spec: `verify` runs it (and reports it), `train --example` trains it, `export` cuts its run
short.  Examples with ``section=None`` go beyond the document (training demos): `verify` runs
them only when named.
"""
from collections.abc import Callable
from dataclasses import dataclass
import importlib
from typing import Any

import torch

from refnet.compare import Check
from refnet.data import load_data
from refnet.spec import Spec


@dataclass
class Context:
    device: str = "cpu"
    dtype: torch.dtype = torch.float64
    strict_bits: bool = False

    @property
    def dtype_name(self):
        return str(self.dtype).replace("torch.", "")


RunFn = Callable[[Context], list[Check]]              # run(ctx): the example's checks
SpecFn = Callable[[str, str], Spec]                   # spec(dtype, device): its one net
DataFn = Callable[[Spec], tuple[torch.Tensor, torch.Tensor]]   # data(spec): (x, target)
ParamsFn = Callable[[Spec], dict[str, torch.Tensor]]  # params(spec): initial params by name
CaseFn = Callable[..., dict[str, Any]]                # case(dtype, steps): fixtures.case_for_spec


@dataclass(frozen=True)
class Example:
    """One example's declaration.  Only name, title, section and run are required."""
    name: str
    title: str
    section: str | None               # the document's section; None: a demo beyond it
    run: RunFn
    dtypes: tuple[str, ...] = ("float32", "float64")
    devices: tuple[str, ...] = ("cpu", "cuda")
    case: CaseFn | None = None        # the case `refnet export` writes
    spec: SpecFn | None = None        # the example's net (None: it trains no single MLP)
    data: DataFn | None = None        # its data set (None: refnet.data.load_data(spec))
    params: ParamsFn | None = None    # its start (None: the spec's seeded init)
    export_default: bool = True       # exported by a plain `refnet export` (False: --example only)

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


REGISTRY: dict[str, Example] = {}
_MODULES = ("seed", "scalar", "activations", "vectorized", "deep", "nonlinearity", "claims",
            "classifiers", "demos", "norm_layers", "train_step", "ffn_stack",
            "mixed_precision")
_loaded = False


def register(name: str, title: str, section: str | None, **options) -> Callable[[RunFn], RunFn]:
    """Decorator: declare ``run`` as the example `name`; options are Example's optional fields."""
    def deco(fn: RunFn) -> RunFn:
        if name in REGISTRY:
            raise RuntimeError(f"example {name!r} registered twice")
        REGISTRY[name] = Example(name, title, section, fn, **options)
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
