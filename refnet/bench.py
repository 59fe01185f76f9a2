"""`refnet bench`: one training step (forward, backward, update), timed side by side.

Variants, each on its own copy of the same parameters and data:
  manual    manual.fast.FastMLP (the readable step with buffers and in-place ops; same bits)
  readable  manual.MLP.train_step (for reference)
  twin      the nn.Module twin with autograd and the same torch.optim optimizer (foreach=False)
  compile   the twin's forward+loss under torch.compile (backward and SGD as the twin); null
            when compilation fails, with the reason
  floor     the manual step's matrix products alone (addmm/mm into preallocated buffers)
  graph     (CUDA) the manual step captured as a CUDA graph

Timing: blocks of k steps per sample, variants interleaved in a rotating order after warm-up
blocks; medians per step.  CPU: time.perf_counter; CUDA: CUDA events, synchronized.  Compile
time is excluded (the first compiled call happens in warm-up) and reported apart.

Peak memory of one step, per side: the bytes the side holds when the step starts (parameters,
gradients, optimizer state, the fast path's buffers; shared storages counted once) plus the
highest net allocation during the step.  CPU: the allocator's own alloc/free events as recorded by
torch.profiler(profile_memory=True), summed in time order.  CUDA: max_memory_allocated() after
reset_peak_memory_stats(), minus memory_allocated() at the start.  Inputs and targets (the same
for both) and BLAS-internal workspaces (outside torch's allocator) are not counted.

An autocast row (``autocast`` in its SIZES entry, e.g. mnist_bf16) runs the twin as the stock
torch.autocast script, the manual side through FastMLP(autocast=…) (its fallback is reported),
the readable side as manual.autocast.AutocastMLP and the floor's GEMMs in the low dtype.

One module (about 460 lines) because it is one measurement: the variants, their timing and their
memory are taken on the same copies in one interleaved run.
"""
import contextlib
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
import torch.utils.deterministic as deterministic_flags  # not loaded by `import torch` alone

import manual
from manual.autocast import AutocastMLP
from manual.fast import CudaGraphStep, FastMLP
from manual.mlp import MLP, init_params
from refnet import data as datasets
from refnet import twin as twin_mod
from refnet.compare import same_bits
from refnet.settings import cpus, determinism

# name -> batch, layer sizes, bias, loss, SGD lr, init, steps per timing block (block),
# timed blocks per variant (reps: full, quick), dtype (default float32); the classification rows
# also name their activation (default sigmoid), optimizer (default SGD with lr and --momentum)
# and data ("spiral": CS231n's 3 arms; "labels": Gaussian inputs, uniform class labels).
SIZES = {
    "xor": dict(batch=4, sizes=[2, 8, 1], bias=True, loss="sum_squared", lr=0.1, init="uniform",
                block=200, reps=(15, 5)),
    "seed": dict(batch=64, sizes=[1000, 100, 10], bias=False, loss="sum_squared", lr=1e-4,
                 init="randn", block=20, reps=(15, 5), dtype=torch.float64),
    "medium": dict(batch=256, sizes=[1024, 1024, 10], bias=True, loss="mse", lr=0.01,
                   init="uniform", block=4, reps=(15, 3)),
    # medium with batch norm / layer norm after the hidden layer
    "medium_bn": dict(batch=256, sizes=[1024, 1024, 10], bias=True, loss="mse", lr=0.01,
                      init="uniform", block=4, reps=(15, 3), norm="batchnorm"),
    "medium_ln": dict(batch=256, sizes=[1024, 1024, 10], bias=True, loss="mse", lr=0.01,
                      init="uniform", block=4, reps=(15, 3), norm="layernorm"),
    "large": dict(batch=1024, sizes=[2048, 2048, 2048], bias=True, loss="mse", lr=0.01,
                  init="uniform", block=1, reps=(7, 2)),
    "spiral_ce": dict(batch=300, sizes=[2, 100, 3], bias=True, loss="cross_entropy", lr=1e-3,
                      init="uniform", block=20, reps=(15, 5), activation="relu",
                      optimizer=("adam", {"lr": 1e-3}), data="spiral"),
    "mnist_ce": dict(batch=1024, sizes=[784, 256, 10], bias=True, loss="cross_entropy", lr=0.01,
                     init="uniform", block=2, reps=(9, 2), activation="relu",
                     optimizer=("sgd", {"lr": 0.01, "momentum": 0.9}), data="labels"),
    # mnist_ce under bf16 autocast with AdamW: the twin is the stock torch.autocast script, the
    # manual side manual.autocast.AutocastMLP through FastMLP(autocast=...) (its fallback shown)
    "mnist_bf16": dict(batch=1024, sizes=[784, 256, 10], bias=True, loss="cross_entropy",
                       lr=1e-3, init="uniform", block=2, reps=(9, 2), activation="relu",
                       optimizer=("adamw", {"lr": 1e-3}), data="labels", autocast="bfloat16"),
    # makemore's MLP (Karpathy, part 3): 3 characters embedded 27×10 and flattened, 30-200-27,
    # batch norm, tanh, cross-entropy, plain SGD, batch 32 of makemore's names data set
    "makemore": dict(batch=32, sizes=[30, 200, 27], bias=True, loss="cross_entropy", lr=0.1,
                     init="uniform", block=20, reps=(15, 5), activation="tanh", norm="batchnorm",
                     embedding={"vocab": 27, "dim": 10, "context": 3},
                     optimizer=("sgd", {"lr": 0.1}), data="names"),
}
QUICK_SIZES = ("xor", "seed")
# The document's program is float64 (numpy).  Its randn init puts ~0.5% of the pre-activations
# below −87, where float32 sigmoid is subnormal, and subnormal operands make every GEMM and
# elementwise kernel an order of magnitude slower (microcode assists), so "seed" defaults to
# float64; the other sizes to float32.  --dtype sets one dtype for all.
WARMUP_BLOCKS = 2
ACTIVATION = "sigmoid"   # the default activation of a row


def machine_threads():
    """The CPUs this process may run on (the thread count a row is also reported at)."""
    return cpus()


# -- the variants ------------------------------------------------------------------------------
def _data(cfg, dtype, device):
    if cfg.get("data") == "names":
        x, y = datasets.names(context=cfg["embedding"]["context"], n_names=200, seed=0,
                              device=device)
        return x[:cfg["batch"]], y[:cfg["batch"]]
    if cfg.get("data") == "spiral":
        return datasets.spiral(n_per_class=cfg["batch"] // cfg["sizes"][-1],
                               classes=cfg["sizes"][-1], seed=0, dtype=dtype, device=device)
    if cfg.get("data") == "labels":
        x, _ = datasets.random(n=cfg["batch"], d_in=cfg["sizes"][0], d_out=1, seed=0, dtype=dtype,
                               device=device)
        gen = torch.Generator().manual_seed(1)
        return x, torch.randint(0, cfg["sizes"][-1], (cfg["batch"],), generator=gen).to(device)
    if cfg["sizes"][0] == 2 and cfg["sizes"][-1] == 1:
        x, labels = datasets.xor(n_copies=max(1, cfg["batch"] // 4), dtype=dtype, device=device)
        return x, labels.to(dtype).unsqueeze(1)
    return datasets.random(n=cfg["batch"], d_in=cfg["sizes"][0], d_out=cfg["sizes"][-1], seed=0,
                           dtype=dtype, device=device)


def _params(cfg, dtype, device):
    return init_params(cfg["sizes"], _activation(cfg), cfg["bias"], scheme=cfg["init"], seed=0,
                       dtype=dtype, device=device, norm=cfg.get("norm"),
                       embedding=cfg.get("embedding"))


def _activation(cfg):
    return cfg.get("activation", ACTIVATION)


def _optimizer(cfg, momentum):
    """(name, settings) of the row's optimizer: its own, else SGD with --momentum."""
    return cfg.get("optimizer") or ("sgd", {"lr": cfg["lr"], "momentum": momentum})


def _manual(cfg, params, momentum):
    name, settings = _optimizer(cfg, momentum)
    return MLP({k: v.clone() for k, v in params.items()}, _activation(cfg), cfg["loss"],
               manual.make_optimizer(name, **settings), norm=cfg.get("norm"),
               embedding=cfg.get("embedding"))


def _twin(cfg, params, dtype, device, momentum):
    twin = twin_mod.Twin(cfg["sizes"], _activation(cfg), cfg["bias"], dtype=dtype, device=device,
                         norm=cfg.get("norm"), embedding=cfg.get("embedding"))
    twin_mod.load_params(twin, params)
    name, settings = _optimizer(cfg, momentum)
    return twin, twin_mod.loss_module(cfg["loss"]), twin_mod.make_optimizer(twin, name, **settings)


def _twin_step(model, loss_fn, opt, x, target, fwd=None):
    opt.zero_grad(set_to_none=True)
    loss = fwd(x, target) if fwd is not None else loss_fn(model(x), target)
    loss.backward()
    opt.step()
    return loss.detach()


def _twin_stepper(cfg, model, loss_fn, opt):
    """The twin's step of the row as a function of (x, target): the stock script, under
    torch.autocast for an autocast row (refnet.twin.autocast_step)."""
    amp = cfg.get("autocast")
    if amp is None:
        return lambda x, target: _twin_step(model, loss_fn, opt, x, target)
    dtype = getattr(torch, amp)
    return lambda x, target: twin_mod.autocast_step(model, loss_fn, opt, x, target, dtype)["loss"]


def _floor(cfg, params, x, target):
    """The manual step's matrix products alone, with the same operands' shapes and layouts (with
    an embedding: the products behind the lookup, on a float input of the flattened width)."""
    n, device, dtype = x.shape[0], x.device, params["layers.0.weight"].dtype
    if cfg.get("autocast"):    # the products in the low dtype, operands cast beforehand
        dtype = getattr(torch, cfg["autocast"])
        params = {k: v.to(dtype) for k, v in params.items()}
        x = x.to(dtype) if x.is_floating_point() else x
    if not x.is_floating_point():
        x = torch.rand((n, cfg["sizes"][0]), dtype=dtype, device=device)
    weights = [params[f"layers.{i}.weight"].clone() for i in range(len(cfg["sizes"]) - 1)]
    biases = [params.get(f"layers.{i}.bias") for i in range(len(weights))]
    hs = [torch.rand((n, w.shape[0]), dtype=dtype, device=device) for w in weights]
    gws = [torch.empty_like(w) for w in weights]
    dys = [torch.empty((n, w.shape[1]), dtype=dtype, device=device) for w in weights]

    def step():
        a = x
        for w, b, h in zip(weights, biases, hs):
            if b is not None:
                torch.addmm(b, a, w.t(), out=h)
            else:
                torch.mm(a, w.t(), out=h)
            a = h
        for i in range(len(weights) - 1, -1, -1):
            torch.mm(hs[i].t(), x if i == 0 else hs[i - 1], out=gws[i])
            if i > 0:
                torch.mm(hs[i], weights[i], out=dys[i])
        return None
    return step


def row_sides(name, device, momentum=0.0):
    """One row's steps as functions of nothing, each on its own copy of the row's parameters and
    data: {"manual": FastMLP's step, "twin": the stock script's, "floor": the GEMMs alone}, and
    the manual step's fallback (None when specialised).  For per-op profiles
    (refnet/bench_profile.py)."""
    cfg = SIZES[name]
    dtype, device = cfg.get("dtype", torch.float32), torch.device(device)
    params = _params(cfg, dtype, device)
    x, target = _data(cfg, dtype, device)
    fast = FastMLP(_manual(cfg, params, momentum), autocast=cfg.get("autocast"))
    twin_step = _twin_stepper(cfg, *_twin(cfg, params, dtype, device, momentum))
    return {"manual": lambda: fast.train_step(x, target), "twin": lambda: twin_step(x, target),
            "floor": _floor(cfg, params, x, target)}, fast.fallback


# -- timing ------------------------------------------------------------------------------------
def _time_block(fn, k, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(k):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / k
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t0) / k


# -- memory ------------------------------------------------------------------------------------
def held_bytes(tensors):
    """Bytes of the distinct storages behind the given tensors (None entries skipped)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


@contextlib.contextmanager
def quiet_stderr():
    """Silence the profiler's C++ start/stop lines (they go to fd 2, below Python's sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def step_peak_bytes(fn, device):
    """Highest net allocation (bytes) above the level at the start of one call of fn."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def step_calls(fn):
    """ATen operator calls of one call of fn, counted from torch.profiler's events: every
    ``aten::`` event not nested in another ``aten::`` event (ops dispatched from Python, from
    the autograd engine's backward nodes or from an optimizer; what an op calls inside is not
    counted again)."""
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def _manual_state(fast):
    return fast.held_tensors()


def _twin_state(model, opt):
    tensors = []
    for p in model.parameters():
        tensors += [p, p.grad]
    for state in opt.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


# -- one size ----------------------------------------------------------------------------------
def bench_size(name, device, dtype=None, quick=False, compile_=True, momentum=0.0, graph=None):
    """One row: the size's variants timed at the current torch thread count."""
    cfg = SIZES[name]
    dtype = dtype or cfg.get("dtype", torch.float32)
    device = torch.device(device)
    graph = device.type == "cuda" if graph is None else graph
    graph = graph and not cfg.get("norm")   # CUDA graphs need FastMLP's specialised plan
    params = _params(cfg, dtype, device)
    x, target = _data(cfg, dtype, device)
    amp = cfg.get("autocast")
    readable = _manual(cfg, params, momentum)
    readable_step = AutocastMLP(readable, amp).train_step if amp else readable.train_step
    fast = FastMLP(_manual(cfg, params, momentum), autocast=amp)
    model, loss_fn, opt = _twin(cfg, params, dtype, device, momentum)
    twin_step = _twin_stepper(cfg, model, loss_fn, opt)
    losses = {"manual": [], "readable": [], "twin": []}
    variants = {
        "manual": lambda: losses["manual"].append(fast.train_step(x, target)),
        "readable": lambda: losses["readable"].append(
            readable_step(x, target)["loss"] if amp else readable_step(x, target)),
        "twin": lambda: losses["twin"].append(twin_step(x, target)),
        "floor": _floor(cfg, params, x, target),
    }
    compile_seconds, compile_error = None, "skipped (--no-compile)"
    if compile_ and amp:
        compile_error = "skipped (autocast row)"
    elif compile_:
        variant, compile_seconds, compile_error = _compile_variant(
            _twin(cfg, params, dtype, device, momentum), x, target)
        if variant is not None:
            variants["compile"] = variant
    if graph and not amp:
        g_fast = FastMLP(_manual(cfg, params, momentum))
        g_step = CudaGraphStep(g_fast, x, target)
        variants["graph"] = lambda: g_step.train_step(x, target)

    reps = cfg["reps"][1 if quick else 0]
    block = max(1, cfg["block"] // (4 if quick else 1))
    times = {k: [] for k in variants}
    names = list(variants)
    for r in range(WARMUP_BLOCKS + reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for v in order:
            t = _time_block(variants[v], block, device)
            if r >= WARMUP_BLOCKS:
                times[v].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}

    # bits: manual vs readable vs twin after the same steps from the same start
    twin_params = twin_mod.params_of(model)
    same = lambda a, b: a.shape == b.shape and bool(same_bits(a, b).all())  # noqa: E731
    bitwise = (len(losses["manual"]) == len(losses["twin"]) == len(losses["readable"])
               and all(same(a, b) and same(a, c) for a, b, c in
                       zip(losses["manual"], losses["twin"], losses["readable"]))
               and all(same(p, twin_params[k]) and same(p, readable.params[k])
                       for k, p in fast.mlp.params.items()))

    manual_peak = held_bytes(_manual_state(fast)) + step_peak_bytes(
        lambda: fast.train_step(x, target), device)
    twin_peak = held_bytes(_twin_state(model, opt)) + step_peak_bytes(
        lambda: twin_step(x, target), device)

    calls = {"manual": step_calls(lambda: fast.train_step(x, target)),
             "twin": step_calls(lambda: twin_step(x, target))}

    opt_name, opt_settings = _optimizer(cfg, momentum)
    ratio = lambda a, b: (med[a] / med[b]) if a in med and b in med else None  # noqa: E731
    row = {
        "size": name, "batch": cfg["batch"], "sizes": cfg["sizes"], "loss": cfg["loss"],
        "bias": cfg["bias"], "activation": _activation(cfg),
        "dtype": str(dtype).replace("torch.", ""), "autocast": amp,
        "threads": torch.get_num_threads(),
        "optimizer": {"name": opt_name, **opt_settings},
        "momentum": opt_settings.get("momentum", 0.0),
        "autograd_over_manual": ratio("twin", "manual"),
        "compile_over_manual": ratio("compile", "manual"),
        "manual_over_floor": ratio("manual", "floor"),
        "readable_over_manual": ratio("readable", "manual"),
        "graph_over_manual": ratio("graph", "manual"),
        "manual_peak_bytes": manual_peak, "twin_peak_bytes": twin_peak,
        "manual_calls": calls["manual"], "twin_calls": calls["twin"],
        "manual_fallback": fast.fallback,
        "bitwise": bool(bitwise),
        "median_seconds": med, "samples": reps, "steps_per_sample": block,
        "compile_seconds": compile_seconds, "compile_error": compile_error,
    }
    return row


def _compile_variant(twin, x, target):
    """(the compiled twin's step, compile seconds, None) or (None, None, the failure)."""
    c_model, c_loss, c_opt = twin
    try:
        from torch import _dynamo  # lazy: the compiler stack takes ~2.5 s to import
        _dynamo.reset()
        fwd = torch.compile(lambda xb, tb: c_loss(c_model(xb), tb))
        t0 = time.perf_counter()
        _twin_step(c_model, c_loss, c_opt, x, target, fwd)
        seconds = time.perf_counter() - t0
        return (lambda: _twin_step(c_model, c_loss, c_opt, x, target, fwd)), seconds, None
    except Exception as exc:  # noqa: BLE001 — any compiler failure is reported, not raised
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        return None, None, f"{type(exc).__name__}: {first_line}"


def thread_counts(threads=None, device="cpu"):
    """The thread counts each row is run at: the one asked for, else 1 and the machine's count
    (one count on CUDA, where the host threads barely matter)."""
    if threads is not None:
        return [threads]
    if torch.device(device).type != "cpu":
        return [torch.get_num_threads()]
    return sorted({1, machine_threads()})


@contextlib.contextmanager
def no_fill():
    """torch.utils.deterministic.fill_uninitialized_memory off, restored on exit."""
    flags = deterministic_flags
    prev = flags.fill_uninitialized_memory
    flags.fill_uninitialized_memory = False
    try:
        yield
    finally:
        flags.fill_uninitialized_memory = prev


def run(size_names=None, device="cpu", dtype=None, quick=False, compile_=True,
        momentum=0.0, threads=None, on_row=None):
    names = list(size_names or (QUICK_SIZES if quick else SIZES))
    counts = thread_counts(threads, device)
    rows, started, saved = [], time.time(), torch.get_num_threads()
    # Timed under determinism() so that both sides run the arithmetic that is verified (TF32 off,
    # float32 matmul "highest"; the bitwise column needs it), but without deterministic mode's
    # filling of fresh allocations with NaN: that fill would cost autograd's new tensors every
    # step and not the fast path's preallocated buffers.  No op timed here has a
    # deterministic-only kernel, so the fill is the flag's only effect on these steps.
    try:
        with determinism(device), no_fill():
            for name in names:
                for n_threads in counts:
                    torch.set_num_threads(n_threads)
                    row = bench_size(name, device, dtype, quick, compile_, momentum)
                    rows.append(row)
                    if on_row:
                        on_row(row)
    finally:
        torch.set_num_threads(saved)
    dev = torch.device(device)
    return {
        "rows": rows,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
        f"cpu ({torch.backends.cpu.get_cpu_capability()})",
        "threads": counts,
        "torch": torch.__version__, "quick": quick, "seconds": round(time.time() - started, 1),
    }
