"""The example registry: every example of the source document, by name.

An example is a function ``run(ctx) -> list[Check]`` registered with ``@register``.  Numbers from
the document appear once, in the example's module, and `verify/` reads them from there.
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

from refnet.compare import TIERS, Verdict


@dataclass
class Context:
    device: str = "cpu"
    dtype: torch.dtype = torch.float64
    strict_bits: bool = False
    allow_tier: str | None = None   # relax the expected tier of manual-vs-autograd checks to this

    @property
    def dtype_name(self):
        return str(self.dtype).replace("torch.", "")


AUTO = "auto"
CLAIM = "measured claim"
CLAIM_TIERS = ("holds", "does not hold")
ALLOW_TIERS = ("ulp", "tolerance")


@dataclass
class Check:
    """One named check of an example: the verdicts of every tensor it compared.

    expected: the tier the check promises (docs/verification.md, "The expected-tier rule").
    "auto": resolved by `enforce_expected` (bitwise on CPU, tolerance on CUDA for a
    manual-vs-autograd check; no tier promise for other oracles, whose verdicts carry their own
    bound); None: no tier promised (the verdicts' own bound still applies); a tier name: falling
    short of it fails the check.  A measured claim (oracle CLAIM) has tier "holds" or
    "does not hold" and its figures, never a numerical tier.
    """
    name: str
    verdicts: list
    oracle: str = "manual vs autograd"   # which two things were compared
    note: str = ""
    expected: str | None = AUTO
    figures: dict | None = None          # a measured claim's numbers

    @property
    def kind(self):
        return "claim" if self.oracle == CLAIM else "comparison"

    @property
    def tier(self):
        if self.kind == "claim":
            return CLAIM_TIERS[0] if self.verdicts and all(v.passed for v in self.verdicts) \
                else CLAIM_TIERS[1]
        return max((v.tier for v in self.verdicts), key=TIERS.index, default="fail")

    def short_of_expected(self):
        """True when the tier reached is worse than the expected tier."""
        exp = self.expected
        if self.kind == "claim" or exp in (None, AUTO):
            return False
        return TIERS.index(self.tier) > TIERS.index(exp)

    @property
    def passed(self):
        return bool(self.verdicts) and all(v.passed for v in self.verdicts) \
            and not self.short_of_expected()

    def failures(self):
        out = [v.message() for v in self.verdicts if not v.passed]
        if self.short_of_expected():
            worst = max(self.verdicts, key=lambda v: TIERS.index(v.tier))
            out.append(f"{self.name}: tier {self.tier} falls short of the expected tier "
                       f"{self.expected} (worst: {worst.message()})")
        return out


def enforce_expected(checks, device, allow_tier=None, strict_bits=False):
    """Resolve each check's expected tier in place (and return the checks).

    A manual-vs-autograd check left at "auto" expects bitwise on CPU and tolerance on CUDA; a
    check that states its own expected tier (an op of refnet.known's not-bitwise table) keeps it.
    allow_tier ("ulp" or "tolerance") relaxes every expectation to at worst that tier;
    strict_bits demands bitwise of every manual-vs-autograd check.
    """
    if allow_tier is not None and allow_tier not in ALLOW_TIERS:
        raise ValueError(f"allow_tier: expected one of {', '.join(ALLOW_TIERS)}, got {allow_tier!r}")
    default = "tolerance" if str(device).startswith("cuda") else "bitwise"
    for c in checks:
        if c.kind == "claim":
            c.expected = None
            continue
        if c.expected == AUTO:
            if c.oracle != "manual vs autograd":
                c.expected = None
                continue
            c.expected = default
        elif c.expected is not None:  # a stated tier, never stricter than the device's
            c.expected = max(c.expected, default, key=TIERS.index)
        if c.oracle == "manual vs autograd" and strict_bits:
            c.expected = "bitwise"
        elif c.expected is not None and allow_tier is not None:
            c.expected = max(c.expected, allow_tier, key=TIERS.index)
    return checks


@dataclass
class Example:
    name: str
    title: str
    section: str
    run: object
    dtypes: tuple = ("float32", "float64")
    devices: tuple = ("cpu", "cuda")
    case: object = None     # optional case(dtype, steps) -> refnet.golden.case_for_spec(...)
    spec: object = None     # optional (dtype="float64", device="cpu") -> Spec: the example's net
    data: object = None     # optional (spec) -> (x, target): its data; None: harness.load_data
    params: object = None   # optional (spec) -> initial params; None: the spec's seeded init

    def build_spec(self, dtype="float64", device="cpu"):
        """The example's one net on (dtype, device); ValueError when it trains no single MLP."""
        if self.spec is None:
            raise ValueError(f"--example: {self.name!r} trains no single MLP; examples that do: "
                             f"{', '.join(trainable())}")
        return self.spec(dtype, device)


REGISTRY = {}
_MODULES = ("seed", "scalar", "activations", "vectorized", "deep", "nonlinearity", "claims",
            "demos")
_loaded = False


def register(name, title, section, dtypes=("float32", "float64"), devices=("cpu", "cuda"),
             case=None, spec=None, data=None, params=None):
    def deco(fn):
        if name in REGISTRY:
            raise RuntimeError(f"example {name!r} registered twice")
        REGISTRY[name] = Example(name, title, section, fn, tuple(dtypes), tuple(devices), case=case,
                                 spec=spec, data=data, params=params)
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


__all__ = ["ALLOW_TIERS", "CLAIM", "Check", "Context", "enforce_expected", "Example", "Verdict", "all_examples", "document_examples", "get",
           "register", "trainable"]
