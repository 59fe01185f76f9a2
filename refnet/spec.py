"""One spec builds both implementations: the manual MLP and the autograd twin.

The JSON form (``refnet verify --spec FILE.json``) has the same keys as the dataclass; docs/spec.md
documents each key and its default.  Unknown keys are rejected.  A relative ``.npz`` path in
"data" is read beside the spec file.
"""
from dataclasses import asdict, dataclass, field, fields
import json
import math
import os
import warnings

import torch

import manual
from manual.autocast import AUTOCAST_DTYPES, REFUSED as AUTOCAST_REFUSED
from manual.grad_scaler import check_scaler_settings
from manual.mlp import INIT_SCHEMES, activation_list
from manual.blocks import block_settings
from manual.clip import clip_settings
from manual.schedules import schedule_settings
from refnet.data import DATASETS, TOKEN_DATASETS
from refnet.twin import CUDA_DROPOUT

DTYPES = {"float32": torch.float32, "float64": torch.float64}
SCALER_KEYS = ("init_scale", "growth_factor", "backoff_factor", "growth_interval")
SCALER_DEFAULTS = {"init_scale": 2.0 ** 16, "growth_factor": 2.0, "backoff_factor": 0.5,
                   "growth_interval": 2000}     # torch.amp.GradScaler's


def autocast_supported(device, dtype_name):
    """False when torch.autocast(device, dtype) would disable itself (a dtype the device lacks,
    e.g. bfloat16 on a CUDA GPU without it).  A CUDA spec on a machine without CUDA is not judged
    here: the device check reports that when the spec runs."""
    if device == "cuda" and not torch.cuda.is_available():
        return True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # torch warns, then switches autocast off
        with torch.autocast(device, dtype=AUTOCAST_DTYPES[dtype_name]):
            return torch.is_autocast_enabled(device)


def check_finite(key, value, minimum=None):
    """A finite int or float (not a bool), at least `minimum` when given; else a ValueError that
    names the key: "KEY: expected a finite number [>= MINIMUM], got VALUE"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{key}: expected a finite number{bound}, got {value!r}")
    return value


# the training-step keys and their off values (the NumPy port keeps the same table); autocast
# stands for grad_scaler too, which needs it
STEP_KEYS_OFF = {"clip_grad_norm": None, "accumulate": 1, "lr_schedule": None, "blocks": None,
                 "autocast": None}


def _default_optimizer():
    return {"name": "sgd", "lr": 0.01}


@dataclass
class Spec:
    sizes: list
    activation: object = "sigmoid"       # a name, or one per hidden layer; sigmoid: the document's,
                                         # and the default of manual.mlp.MLP and twin.Twin too
    bias: bool = True
    loss: str = "sum_squared"
    reg: float = 0.0                     # L2 regularization: loss + reg·Σ W² over weights (not biases)
    optimizer: dict = field(default_factory=_default_optimizer)
    steps: int = 100
    batch_size: int | None = None        # None: full batch
    data: str = "random"                 # xor | circles | spiral | random | names | path/to/file.npz
    n_samples: int | None = None         # size of a generated data set (None: its default)
    dtype: str = "float64"
    device: str = "cpu"
    seed: int = 0
    init: str = "uniform"                # uniform (nn.Linear's) | randn (the document's)
    slope: float = 0.1                   # leaky_relu
    alpha: float = 1.0                   # elu
    k: int = 2                           # maxout pieces
    norm: str | None = None              # null | batchnorm | layernorm, after each hidden linear
    dropout: float = 0.0                 # p of inverted dropout after each hidden activation
    momentum: float = 0.1                # batch norm's running-statistics momentum
    eps: float = 1e-5                    # the norms' eps
    embedding: dict | None = None        # {"vocab": V, "dim": E, "context": T}: integer inputs (N, T)
    clip_grad_norm: dict | None = None   # {"max_norm": M, "norm_type": 2 | "inf"}: clip_grad_norm_
    accumulate: int = 1                  # micro-batches of batch_size rows per optimizer step
    lr_schedule: dict | None = None      # {"name": warmup_cosine | cosine | step, ...} over `steps`
    blocks: dict | None = None           # {"n", "width", "hidden", "norm", "activation"}: FFN blocks
    autocast: str | None = None          # null | bfloat16 | float16: mixed precision, float32 params
    grad_scaler: object = None           # null/false | true (torch's defaults) | {init_scale, …}
    name: str = "spec"

    def __post_init__(self):
        self.validate()

    # -- validation: every message names the key and what was expected --
    def validate(self):
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(self.sizes, (list, tuple)) or len(self.sizes) < 2 \
                or not all(is_int(s) for s in self.sizes):
            raise ValueError(f"sizes: expected a list of at least 2 integers, got {self.sizes!r}")
        if any(s < 1 for s in self.sizes):
            raise ValueError(f"sizes: expected every width >= 1, got {list(self.sizes)}")
        self.sizes = list(self.sizes)
        n_hidden = len(self.sizes) - 2
        activation_list(self.activation, n_hidden)
        if not isinstance(self.activation, str):
            self.activation = list(self.activation)
        if not isinstance(self.bias, bool):
            raise TypeError(f"bias: expected true or false, got {self.bias!r}")
        if self.loss not in manual.LOSSES:
            raise ValueError(f"loss: unknown name {self.loss!r}; expected one of "
                             f"{', '.join(manual.LOSSES)}")
        check_finite("reg", self.reg, minimum=0)
        if not isinstance(self.optimizer, dict) or "name" not in self.optimizer:
            raise ValueError(f"optimizer: expected an object with a 'name', got {self.optimizer!r}")
        opt = dict(self.optimizer)
        manual.make_optimizer(opt.pop("name"), **opt)  # validates name and settings
        if not is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps: expected an integer >= 1, got {self.steps!r}")
        if self.batch_size is not None and (not is_int(self.batch_size) or self.batch_size < 1):
            raise ValueError(f"batch_size: expected an integer >= 1 or null, got {self.batch_size!r}")
        if not isinstance(self.data, str) or (self.data not in DATASETS
                                              and not self.data.endswith(".npz")):
            raise ValueError(f"data: expected one of {', '.join(DATASETS)} or a path to an .npz "
                             f"file, got {self.data!r}")
        if self.data.endswith(".npz") and not os.path.isfile(self.data):
            raise ValueError(f"data: file not found: {self.data}")
        if self.n_samples is not None and (not is_int(self.n_samples) or self.n_samples < 1):
            raise ValueError(f"n_samples: expected an integer >= 1 or null, got {self.n_samples!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected cpu or cuda, got {self.device!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed!r}")
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init: expected one of {', '.join(INIT_SCHEMES)}, got {self.init!r}")
        for key in ("slope", "alpha"):
            check_finite(key, getattr(self, key))
        if not is_int(self.k) or self.k < 1:
            raise ValueError(f"k: expected an integer >= 1, got {self.k!r}")
        manual.check_norm(self.norm)
        manual.check_dropout(self.dropout)
        manual.check_embedding(self.embedding)
        if self.dropout and self.device == "cuda":
            raise ValueError(CUDA_DROPOUT)
        for key, lo_open in (("momentum", False), ("eps", True)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 \
                    or (lo_open and v == 0):
                raise ValueError(f"{key}: expected a number in {'(0, 1]' if lo_open else '[0, 1]'}, "
                                 f"got {v!r}")
        if self.embedding is not None:
            e = self.embedding
            if self.sizes[0] != e["context"] * e["dim"]:
                raise ValueError(f"embedding: context·dim = {e['context'] * e['dim']} must equal "
                                 f"sizes[0], got {self.sizes[0]}")
            if self.data in DATASETS and self.data not in TOKEN_DATASETS:
                raise ValueError(f"embedding: needs integer token data ({', '.join(TOKEN_DATASETS)} "
                                 f"or an .npz of indices), but data {self.data!r} is real-valued")
        elif self.data in TOKEN_DATASETS:
            raise ValueError(f"data: {self.data!r} is integer token data; it needs the embedding key")
        if self.norm == "batchnorm" and self.batch_size == 1:
            raise ValueError("batch_size: batch norm in training needs at least 2 rows in every "
                             "batch; got batch_size 1")
        self._validate_step_keys()
        self._validate_mixed_precision()
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")

    def _validate_step_keys(self):
        """clip_grad_norm, accumulate, lr_schedule, blocks (normalized in place).  The check that
        the data holds k micro-batches needs the data: the training loop makes it."""
        if self.clip_grad_norm is not None:
            self.clip_grad_norm = clip_settings(self.clip_grad_norm)
        if isinstance(self.accumulate, bool) or not isinstance(self.accumulate, int) \
                or self.accumulate < 1:
            raise ValueError(f"accumulate: expected an integer >= 1, got {self.accumulate!r}")
        if self.lr_schedule is not None:
            schedule_settings(self.lr_schedule, self.steps)    # validates, warm-up vs the run
            self.lr_schedule = dict(self.lr_schedule)
        if self.blocks is not None:
            self.blocks = block_settings(self.blocks)
            if len(self.sizes) < 3 or self.sizes[-2] != self.blocks["width"]:
                raise ValueError(f"blocks.width: {self.blocks['width']} must equal the width the "
                                 f"blocks sit in, sizes[-2] (the last hidden width, the head's "
                                 f"input), got sizes {self.sizes}")

    def step_keys_on(self):
        """The training-step keys (STEP_KEYS_OFF) this spec sets to other than their off value,
        for the paths that do not carry them yet to refuse by name."""
        return [key for key, off in STEP_KEYS_OFF.items() if getattr(self, key) != off]

    def refuse_step_keys(self, where, carried=()):
        """A ValueError naming the first step key set, for a path (`where`) that lacks it;
        carried: the keys that path does carry (not refused)."""
        on = [key for key in self.step_keys_on() if key not in carried]
        if on:
            raise ValueError(f"{on[0]}: {where} does not carry this key yet; remove it, or run the "
                             f"spec without {where}")

    def _validate_mixed_precision(self):
        """autocast and grad_scaler (docs/spec.md): one-line errors naming the key."""
        if self.autocast is None:
            if self.grad_scaler not in (None, False):
                raise ValueError("grad_scaler: needs autocast (bfloat16 or float16); got autocast "
                                 "null")
            return
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast: unknown dtype {self.autocast!r}; expected one of "
                             f"{', '.join(AUTOCAST_DTYPES)} or null")
        if self.dtype != "float32":
            raise ValueError(f"autocast: needs dtype float32 (the master weights), got dtype "
                             f"{self.dtype}; autocast casts only float32 tensors")
        if self.blocks is not None:
            raise ValueError(AUTOCAST_REFUSED["blocks"])
        if not autocast_supported(self.device, self.autocast):
            raise ValueError(f"autocast: {self.autocast} is not supported on device "
                             f"{self.device} (torch.autocast would switch itself off)")
        if self.grad_scaler is not None and not isinstance(self.grad_scaler, (bool, dict)):
            raise ValueError(f"grad_scaler: expected true, false, null or an object with "
                             f"{', '.join(SCALER_KEYS)}, got {self.grad_scaler!r}")
        if isinstance(self.grad_scaler, dict):
            unknown = sorted(set(self.grad_scaler) - set(SCALER_KEYS))
            if unknown:
                raise ValueError(f"grad_scaler: unknown key(s) {unknown}; expected keys among "
                                 f"{list(SCALER_KEYS)}")
            check_scaler_settings(**{**SCALER_DEFAULTS, **self.grad_scaler})

    @property
    def scaler_settings(self):
        """GradScaler's four settings (torch's defaults filled in), or None without a scaler."""
        if self.grad_scaler in (None, False):
            return None
        given = self.grad_scaler if isinstance(self.grad_scaler, dict) else {}
        return {**SCALER_DEFAULTS, **given}

    @property
    def autocast_dtype(self):
        """torch.bfloat16 / torch.float16, or None when autocast is off."""
        return None if self.autocast is None else AUTOCAST_DTYPES[self.autocast]

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def activations(self):
        return activation_list(self.activation, len(self.sizes) - 2)

    @property
    def options(self):
        return {"slope": self.slope, "alpha": self.alpha, "k": self.k}

    @property
    def layer_options(self):
        """The optional layers' settings, as MLP and Twin take them."""
        return {"norm": self.norm, "dropout": self.dropout, "momentum": self.momentum,
                "eps": self.eps, "embedding": self.embedding, "blocks": self.blocks}

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, raw, **overrides):
        if not isinstance(raw, dict):
            raise ValueError(f"spec: expected a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"spec: unknown key(s) {unknown}; expected keys among {sorted(known)}")
        if "sizes" not in raw:
            raise ValueError("sizes: required key missing from the spec")
        return cls(**{**raw, **overrides})

    @classmethod
    def from_json(cls, path, **overrides):
        if os.path.isdir(path):
            raise ValueError(f"--spec: {path} is a folder; expected a JSON file")
        if not os.path.isfile(path):
            raise ValueError(f"--spec: file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--spec: {path} is not valid JSON (line {exc.lineno}, column "
                             f"{exc.colno}: {exc.msg})") from None
        except UnicodeDecodeError:
            raise ValueError(f"--spec: {path} is not UTF-8 text") from None
        if isinstance(raw, dict) and "name" not in raw:
            raw["name"] = os.path.splitext(os.path.basename(path))[0]
        if isinstance(raw, dict) and "data" in raw:
            raw["data"] = _beside(path, raw["data"])
        return cls.from_dict(raw, **overrides)


def _beside(spec_path, data):
    """A relative .npz path in a spec file names a file beside the spec, not in the current
    folder: `"data": "mine.npz"` in runs/net.json is runs/mine.npz wherever refnet runs."""
    if isinstance(data, str) and data.endswith(".npz") and not os.path.isabs(data):
        return os.path.join(os.path.dirname(os.path.abspath(spec_path)), data)
    return data
