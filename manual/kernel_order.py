"""The kernels' order of operations: the helpers that make a manual backward bit-identical.

A formula fixes what is computed; a CPU kernel also fixes the order its sums run in and which
``a·b + c`` the compiler contracts into one FMA, and those decide the last bits.  The forward and
backward passes in losses.py and norm.py are written as the math and call one helper from here
wherever that order decides the bits.  Each helper names the ATen kernel (file, function) and the
order it reproduces, and what was measured (torch 2.13 CPU, AVX-512 and AVX2).  kernel_exp.py is
the companion for eˣ (SLEEF's algorithm and which positions are vector lanes).

FMA: ``torch.addcmul(c, a, b)`` is one fused multiply-add on x86 CPUs (see kernel_exp.py).
"""
import torch

from manual.kernel_exp import VECTOR_BITS, SleefExpFloat32, sleef_exp


# --- threads ------------------------------------------------------------------------------------
def thread_chunks(n):
    """Row ranges of at::parallel_for(0, n, grain 1) on OpenMP (aten/src/ATen/ParallelOpenMP.h):
    ceil(n / threads) rows each, threads = min(torch threads, n)."""
    threads = max(1, min(torch.get_num_threads(), n))
    size = -(-n // threads)
    return [(s, min(n, s + size)) for s in range(0, n, size)]


# --- sequential sums ----------------------------------------------------------------------------
def sequential_sum_into(acc, index, values, alpha=1):
    """acc[index[i]] += alpha·values[i] for i = 0, 1, … in that order, each add rounded in the
    tensor's dtype; returns acc.

    On the CPU, ``index_add_`` of a 1-D tensor is exactly this serial loop
    (aten/src/ATen/native/TensorAdvancedIndexing.cpp, index_add_cpu_out:
    ``*self_ip += source[i] * alpha``; ·1 and ·(−1) are exact), one thread, so it sums many short
    sequences in their written order in one op — unlike ``sum``, which vectorizes and blocks.
    acc, index, values: 1-D.  Used for the nll cascade and multi_margin_loss's row sums.
    """
    return acc.index_add_(0, index, values, alpha=alpha)


class ChunkedColumnSums:
    """Per-column sums over the rows of an (N, D) tensor in a CPU kernel's order, in a fixed
    number of torch calls whatever N: each thread chunk's rows (``thread_chunks``) added one by
    one in the tensor's dtype, then the chunk partials added in ``fold_dtype`` starting from +0
    and rounded back (the order of batch_norm_cpu_backward_channels_last_impl and of layer
    norm's dweight/dbias loop).

    ``sum(values)``: Σₙ values — ``index_add_`` of each row into its chunk's partial.  For a 2-D
    tensor every CPU path of index_add_cpu_out (aten/src/ATen/native/TensorAdvancedIndexing.cpp)
    adds the source rows in index order per column, rounding each add: the reused-iterator
    ``add_stub`` per row; the scatter_add_ it takes for dim 0 with alpha 1, whose
    cpu_scatter_gather_base_kernel loops the rows outermost, or whose expanded-index path
    (ScatterGatherKernel.cpp) stable-radix-sorts by target row and map2-adds the rows in order.
    ``dot(a, b)``: Σₙ a·b with one FMA per step — ``torch._foreach_addcmul_`` over the steps: on
    the CPU it is foreach_tensor_addcmul_scalar_slow_ (aten/src/ATen/native/ForeachOpsKernels.cpp),
    ``input[i].addcmul_(t1[i], t2[i])`` for i = 0, 1, … in list order, and addcmul is one FMA
    (see the module docstring).  Step i adds row i of every chunk at once: chunk c's rows start
    at c·S (S = ceil(N / threads), only the last chunk shorter), so rows i, i + S, … are the
    strided view ``a[i::S]`` and their partials the first rows of ``partials``: S calls inside
    one foreach whatever the thread count (N at one thread).

    The plan (chunk of each row, the partials and their step views) depends on N, D and the
    thread count; it is built once and may be reused by a caller with fixed shapes
    (``matches``); the step views of the last two tensors dot saw are kept while they are the
    same tensors.
    Partials are never −0 (a sum started from +0 cannot become −0), so folding from +0 is exact:
    one chunk's sum is its partial (+0 + p = p, and p → float64 → p round-trips); two chunks'
    is p₀ + p₁ rounded once in the dtype (a sum of two floats rounded to float64 and then to
    float32 is the correctly rounded float32 sum: 53 ≥ 2·24 + 2), so the fold in fold_dtype runs
    only for three chunks or more.
    """

    def __init__(self, n, d, dtype, device, fold_dtype):
        chunks = thread_chunks(n)
        self.threads, self.shape, self.dtype = torch.get_num_threads(), (n, d), dtype
        self.chunk_of_row = torch.tensor([c for c, (b, e) in enumerate(chunks) for _ in range(b, e)],
                                         dtype=torch.int64, device=device)
        self.partials = torch.zeros(len(chunks), d, dtype=dtype, device=device)
        self.step = chunks[0][1] - chunks[0][0]                   # S: rows per chunk
        self.partial_steps = [self.partials[:len(range(i, n, self.step))] for i in range(self.step)]
        self.fold_index = torch.zeros(len(chunks), dtype=torch.int64, device=device)
        self.total = torch.zeros(1, d, dtype=fold_dtype, device=device)
        self.out_steps = {}   # id(out) -> (out, [out as (1, D)] per step): one-chunk targets
        self.kept = [(None, None), (None, None)]                  # (tensor, its step views)

    def matches(self, n, d):
        """Whether this plan still holds for an (n, d) input at the current thread count."""
        return self.shape == (n, d) and self.threads == torch.get_num_threads()

    def sum(self, values, out=None):
        """Σₙ values (N, D) -> (D,), into out if given."""
        partials = self._partials(out)
        partials.zero_().index_add_(0, self.chunk_of_row, values)
        return self._fold(out)

    def _steps(self, t, slot):
        kept_t, views = self.kept[slot]
        if kept_t is not t:
            views = [t[i::self.step] for i in range(self.step)]
            self.kept[slot] = (t, views)
        return views

    def dot(self, a, b, out=None):
        """Σₙ a·b (N, D) -> (D,), one FMA per step, into out if given."""
        partials = self._partials(out)
        steps = self.partial_steps if partials is self.partials else self.out_steps[id(out)][1]
        partials.zero_()
        torch._foreach_addcmul_(steps, self._steps(a, 0), self._steps(b, 1))
        return self._fold(out)

    def _partials(self, out):
        """Where the chunk sums go: with one chunk straight into out (its sum is its partial);
        out's (1, D) view and its step list are kept while out is the same tensor."""
        if self.partials.shape[0] == 1 and out is not None and out.is_contiguous():
            kept = self.out_steps.get(id(out))
            if kept is None or kept[0] is not out:
                row = out.view(1, -1)
                kept = self.out_steps[id(out)] = (out, [row] * self.step, row)
            return kept[2]
        return self.partials

    def _fold(self, out):
        partials = self.partials
        if out is not None and partials.shape[0] == 1:
            return out if out.is_contiguous() else out.copy_(partials[0])
        if partials.shape[0] <= 2:
            folded = partials[0] if partials.shape[0] == 1 else torch.add(
                partials[0], partials[1], out=out)
            return folded.clone() if out is None and partials.shape[0] == 1 else folded
        self.total.zero_().index_add_(0, self.fold_index, partials.to(self.total.dtype))
        if out is None:
            return self.total[0].to(self.dtype, copy=True)
        return out.copy_(self.total[0])


# --- nll_loss: the summation cascade ------------------------------------------------------------
NLL_LEVELS = 8        # nll_loss_out_frame's cascade_sum_num_levels
NLL_LEVEL_POWER = 4   # its level_power: max(4, CeilLog2(N) / 8), i.e. 4 for N ≤ 2^39
NLL_LEVEL_STEP = 1 << NLL_LEVEL_POWER


def nll_mean_reference(picked, n):
    """−(1/N) Σ picked, one sample at a time exactly as nll_loss_out_frame
    (aten/src/ATen/native/LossNLL.cpp) loops.

    The plain reference for ``nll_mean`` (O(N) tensor ops; tests compare the two bit for bit).
    The kernel keeps 8 partial sums; each sample is subtracted from partial 0, and whenever the
    sample index b has its low 4·(j+1) bits zero, partial j is folded into partial j+1.  At the
    end partials 0..7 are added in order, and the sum is divided by (scalar_t)N.
    """
    zero = torch.zeros((), dtype=picked.dtype, device=picked.device)
    partial = [zero] * NLL_LEVELS
    for b in range(n):
        partial[0] = partial[0] - picked[b]
        for j in range(NLL_LEVELS - 1):
            if b & ((NLL_LEVEL_STEP - 1) << (NLL_LEVEL_POWER * j)):
                break
            partial[j + 1] = partial[j + 1] + partial[j]
            partial[j] = zero
    total = zero
    for p in partial:
        total = total + p
    return total / float(n)


class NllCascade:
    """nll_loss_out_frame's cascade (LossNLL.cpp) for N samples, as a fixed plan of sequential sums.

    The kernel's cascade (``nll_mean_reference`` follows it one sample at a time) is a fixed
    blocked summation.  Level j starts at 0, takes its inputs one by one (level 0: the samples,
    subtracted) and, after input m with m % 16 == 0 (m = 0 included), hands its sum to level
    j+1 and restarts at 0.  So its hand-offs are the sums of the groups {v₀}, {v₁..v₁₆},
    {v₁₇..v₃₂}, … — input m is in group (m + 15) // 16 — and what it holds at the end is the sum
    of the incomplete last group (0 if there is none).  Level 7 never hands off: everything it
    receives is one group.  A level that receives a single value hands it up unchanged
    (0 + v = v: a sum started at +0 is never −0), so the levels stop there and that value is
    what partial 7 ends with.  Partials that are 0 are left out of the final sum (s + 0 = s for
    the same reason); the others are added in level order, starting from 0, and divided by N.

    All levels' group sums live in one flat buffer of ``size`` entries: level j's in
    ``[offset_j, offset_j + groups_j)``.  ``levels``: (offset, groups, alpha, group index
    (inputs,) int64, where its inputs start: None for the samples (level 0), else the offset of
    the level below, whose first sums they are); ``kept``: (P,) int64 positions of the partials
    to add at the end.
    """

    def __init__(self, n, device="cpu"):
        self.n, self.levels, kept = n, [], []
        offset, length, level, last = 0, n, 0, None
        while level < NLL_LEVELS and (length > 1 or level == 0):
            if level == NLL_LEVELS - 1:
                group = torch.zeros(length, dtype=torch.int64, device=device)
                groups = 1
            else:
                group = torch.arange(NLL_LEVEL_STEP - 1, length + NLL_LEVEL_STEP - 1,
                                     device=device) // NLL_LEVEL_STEP
                groups = (length - 1 + NLL_LEVEL_STEP - 1) // NLL_LEVEL_STEP + 1
            self.levels.append((offset, groups, -1 if level == 0 else 1, group, last))
            if level == NLL_LEVELS - 1:
                kept.append(offset)                       # partial 7 sums all it receives
            elif (length - 1) % NLL_LEVEL_STEP:           # an incomplete last group: kept
                kept.append(offset + groups - 1)
                length = groups - 1
            else:
                length = groups
            last, offset, level = offset, offset + groups, level + 1
        if level < NLL_LEVELS:                            # stopped at a single hand-off:
            kept.append(last)                             # the value rising to partial 7
        self.size = offset
        self.kept = torch.tensor(kept, dtype=torch.int64, device=device)
        self.kept_into = torch.zeros(len(kept), dtype=torch.int64, device=device)

    def mean(self, picked, sums, kept_values, total):
        """−(1/N) Σ picked with the kernel's bits, in 3 + (levels) ops, into the given buffers:
        sums (size,), kept_values (P,), total (1,), all of picked's dtype.  Returns a new 0-d
        tensor."""
        return self.bind(sums, kept_values, total)(picked)

    def bind(self, sums, kept_values, total):
        """``mean`` with its buffers fixed: the slices of sums each level reads and writes made
        once.  Returns mean(picked) -> a new 0-d tensor."""
        steps = [(sums[offset:offset + groups], group,
                  None if below is None else sums[below:below + group.shape[0]], alpha)
                 for offset, groups, alpha, group, below in self.levels]
        total_0d, n = total.view(()), float(self.n)

        def mean(picked):
            sums.zero_()
            for target, group, inputs, alpha in steps:
                sequential_sum_into(target, group, picked if inputs is None else inputs, alpha)
            torch.index_select(sums, 0, self.kept, out=kept_values)
            sequential_sum_into(total.zero_(), self.kept_into, kept_values)
            return total_0d / n
        return mean


def nll_mean(picked, n):
    """−(1/N) Σ picked with the bits of nll_loss_out_frame (LossNLL.cpp), in O(1) tensor ops
    (see NllCascade; ``nll_mean_reference`` is the plain one-sample-at-a-time version)."""
    plan = NllCascade(n, picked.device)
    new = lambda size: picked.new_empty(size)  # noqa: E731
    return plan.mean(picked, new(plan.size), new(plan.kept.shape[0]), new(1))


# --- log_softmax backward: its exp --------------------------------------------------------------
def _sleef_exp_applies(dtype, device):
    return device.type == "cpu" and dtype in (torch.float32, torch.float64) \
        and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def log_softmax_backward_exp(logp):
    """exp as the CPU log_softmax backward kernel evaluates it (aten/src/ATen/native/cpu/
    SoftMaxKernel.cpp, _vec_host_softmax_backward_lastdim, log variant: vec::map2 of
    ``x - y.exp() * Vec(sum)``): every element, partial last vector included, goes through
    Sleef's exp on AVX2/AVX512 builds (no scalar tail, unlike elu_backward), so
    manual.kernel_exp.sleef_exp applies at every position.  GCC contracts ``x − e·s`` into one FMA:
    the caller forms it with addcmul.

    Elsewhere (CUDA, or a CPU run with ATEN_CPU_CAPABILITY=default) it is torch.exp: not verified
    bitwise there; expect the `ulp` tier at worst.
    """
    if _sleef_exp_applies(logp.dtype, logp.device):
        return sleef_exp(logp)
    return torch.exp(logp)


class LogSoftmaxBackwardExp:
    """``log_softmax_backward_exp`` for inputs of one shape: float32 on AVX2/AVX512 through one
    SleefExpFloat32 whose buffers are kept (its result is written into one of them, valid until
    the next call); otherwise the function itself (new tensors)."""

    def __init__(self, shape, dtype, device):
        self.plan = SleefExpFloat32(shape, device) \
            if dtype == torch.float32 and _sleef_exp_applies(dtype, device) else None

    def buffers(self):
        return [] if self.plan is None else self.plan.buffers()

    def __call__(self, logp):
        if self.plan is None:
            return log_softmax_backward_exp(logp)
        return self.plan(logp, out=self.plan.c)


# --- batch norm: batch_norm_cpu_backward_channels_last_impl -------------------------------------
def bn_column_sums(xc, dout, fold_dtype=torch.float64):
    """(Σₙ dout, Σₙ xc·dout) per feature (xc = x − μ) in the order of
    aten/src/ATen/native/cpu/batch_norm_kernel.cpp, batch_norm_cpu_backward_channels_last_impl
    (an (N, D) input is "NC11", channels last): sequential over the rows of each thread chunk in
    x's dtype (vec::map2 ``sum + dy``; vec::map4 ``dotp + (x − mean)·dy``, one FMA per step), then
    the chunk partials added in float64 starting from +0 (acc_type<float, false> is double) and
    rounded back.  Measured bitwise on AVX-512 and AVX2, 1 and 2 threads.  The mixed-dtype
    kernel (bf16/fp16 x, float32 weight: autocast) keeps float partials and adds them in float
    (opmath): fold_dtype torch.float32, on the cast-up xc and dout."""
    sums = ChunkedColumnSums(xc.shape[0], xc.shape[1], xc.dtype, xc.device, fold_dtype)
    return sums.sum(dout), sums.dot(xc, dout)


# Width in bits of the trailing columns whose dx the kernel does not contract into an FMA,
# measured per CPU capability (torch 2.13, GCC build): AVX-512 the last D mod 256 bits (half its
# 512-bit vector); AVX2 the whole masked tail, D mod Vec::size() (its vector is 256 bits: 8
# float32, 4 float64), 1200 shapes x train/eval x 1-2 threads bitwise on an AMD EPYC.
_BN_PLAIN_TAIL_BITS = {"AVX512": 256, "AVX2": 256}


def bn_dx_fma_columns(n_features, dtype, device):
    """How many leading columns batch_norm_cpu_backward_channels_last_impl evaluates with the
    contracted (FMA) dx formula.

    The kernel's loop takes Vec::size() columns at a time and then a masked tail of
    D mod Vec::size() columns.  Measured (``_BN_PLAIN_TAIL_BITS``): on AVX-512 all but the last
    D mod 8 float32 / D mod 4 float64 columns are contracted; on AVX2 all but the masked tail,
    which is the same D mod 8 / D mod 4.  Other capabilities are not measured: 128-bit halves
    of a 256-bit vector are assumed.
    """
    if device.type != "cpu":
        return n_features
    capability = torch.backends.cpu.get_cpu_capability()
    bits = _BN_PLAIN_TAIL_BITS.get(capability, VECTOR_BITS.get(capability, 256) // 2)
    lanes = bits // torch.finfo(dtype).bits
    return n_features - n_features % lanes


def bn_dx_inner(dout, grad_mean, xc, k):
    """(dy − grad_mean) − xc·k per element, as batch_norm_cpu_backward_channels_last_impl's
    ``dy - grad_mean - dx`` (dx = (x − mean)·k): GCC contracts it into one FMA (one rounding)
    in all but the last columns (``bn_dx_fma_columns``), which take two roundings."""
    fused = torch.addcmul(dout - grad_mean, xc, k, value=-1)   # one rounding: FMA
    split = bn_dx_fma_columns(xc.shape[1], xc.dtype, xc.device)
    if split < xc.shape[1]:
        plain = dout - grad_mean - xc * k                       # two roundings
        fused = torch.cat([fused[:, :split], plain[:, split:]], 1)
    return fused


def bn_mixed_dx_inner(dout, grad_mean, xc, k, low):
    """(dy − grad_mean) − xc·k as the mixed-dtype kernel (batch_norm_cpu_backward_channels_last_
    internal<L, float>, on the cast-up float32 values) evaluates it.  It takes one L vector (two
    float vectors) at a time, then a scalar tail of D mod (2·float lanes) columns; the tail is
    contracted into one FMA, and so is the vector body for float16 but not for bfloat16 (two
    roundings there): the build's code generation differs per L.  Measured on AVX2 (16-column
    blocks; 8 shapes × 30 draws, the four body/tail choices: only this one is bitwise for both
    dtypes); other capabilities: the same rule at their width, not measured."""
    fused = torch.addcmul(dout - grad_mean, xc, k, value=-1)     # one rounding: FMA
    if low != torch.bfloat16:
        return fused
    block = 2 * VECTOR_BITS.get(torch.backends.cpu.get_cpu_capability(), 256) // 32 \
        if xc.device.type == "cpu" else 1
    split = xc.shape[1] - xc.shape[1] % block
    plain = dout - grad_mean - xc * k                            # two roundings
    return torch.cat([plain[:, :split], fused[:, split:]], 1)


# --- layer norm: layer_norm_backward_frame ------------------------------------------------------
def ln_lanes(dtype, device):
    """Lanes of the vectors layer_norm_backward_frame (aten/src/ATen/native/cpu/
    layer_norm_kernel.cpp) reduces in: 256-bit ones (8 float32, 4 float64), measured on AVX-512
    and on AVX2 (AMD EPYC) with torch 2.13; 0 where not measured (plain sums)."""
    if device.type != "cpu" or torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX2"):
        return 0
    return 256 // torch.finfo(dtype).bits


def _ln_row_sum_plain(factors, lanes):
    """LnRowSums.sum where the kernel has no full vector: D < lanes (left to right) or lanes 0."""
    terms = factors[0] * factors[1]
    terms = terms * factors[2] if len(factors) == 3 else terms
    if not lanes:
        return terms.sum(1, keepdim=True)
    total = terms[:, :1]
    for j in range(1, terms.shape[1]):
        total = total + terms[:, j:j + 1]
    return total


class LnRowSums:
    """Σⱼ Πfactors per row, as layer_norm_backward_frame's vec::map{2,3}_reduce_all sums it,
    for inputs (N, D) of one shape and dtype: ``sum(factors, work)`` (factors: 2 or 3 tensors
    (N, D), the third broadcast from (D,) allowed -> (N, 1)).

    D < lanes: left to right.  Otherwise a lanes-wide accumulator starts from the first chunk,
    adds each further full chunk (acc + product, two roundings), adds the partial last chunk with
    one FMA per lane (the compiler contracts that one), then folds the lanes: float32 by the
    shuffle tree (lane i + lane i^4, then i^2, then i^1), float64 left to right.  lanes 0:
    torch.sum.  The products are formed in row-major order (N, D) and the full chunks' sequential
    adds are one ``index_add_`` along the chunk dimension of their (N, chunks, lanes) view (each
    position's sources added in index order, the order ChunkedColumnSums relies on) into a copy of
    chunk 0 (not 0 + it, so a −0 product stays −0 as in the kernel): a fixed number of torch calls
    whatever D.  work: a contiguous buffer of at least N·D elements for the products (else a new
    one); the accumulator and the fold's buffers are kept, two sets (``slot`` 0 or 1): a result
    is valid until the next call with the same slot.
    """

    def __init__(self, n, d, dtype, device):
        self.lanes = ln_lanes(dtype, device)
        self.shape, self.full = (n, d), d - d % self.lanes if self.lanes else 0
        if not self.full:
            return
        lanes, chunks = self.lanes, self.full // self.lanes
        new = lambda *shape: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
        self.acc = new(n, 1, lanes)
        self.later = torch.zeros(chunks - 1, dtype=torch.int64, device=device)
        self.tree = dtype == torch.float32
        widths = [lanes >> k for k in range(1, lanes.bit_length())] if self.tree else [1]
        self.folds = [[new(n, 1, width) for width in widths] for _ in range(2)]

    def sum(self, factors, work=None, slot=0):
        n, d = self.shape
        lanes, full = self.lanes, self.full
        if not full:
            return _ln_row_sum_plain(factors, lanes)
        products = factors[0].new_empty((n, d)) if work is None else work.view(-1)[:n * d].view(n, d)
        torch.mul(factors[0], factors[1], out=products)
        if len(factors) == 3:   # (a·b)·c on the full chunks; the tail keeps a·b for its FMA
            products[:, :full].mul_(factors[2][..., :full])
        chunked = products[:, :full].unflatten(1, (full // lanes, lanes))   # (N, chunks, lanes)
        acc = self.acc.copy_(chunked[:, :1])
        if full > lanes:
            acc.index_add_(1, self.later, chunked[:, 1:])
        if full < d:   # the partial last chunk: fma(head, last factor, acc) in its first lanes
            r = d - full
            head = products[:, full:] if len(factors) == 3 else factors[0][:, full:]
            acc[:, 0, :r].addcmul_(head, factors[-1][..., full:])
        folds = self.folds[slot]
        if self.tree:   # float32: the shuffle tree
            for out in folds:
                half = out.shape[2]
                acc = torch.add(acc[..., :half], acc[..., half:], out=out)
            return acc.view(n, 1)
        total = torch.add(acc[..., 0], acc[..., 1], out=folds[0].view(n, 1))
        for j in range(2, lanes):
            total.add_(acc[..., j])
        return total


def ln_row_sums(dout, x, weight, work=None, plan=None):
    """(Σⱼ dy·x·w, Σⱼ dy·w) per row (N, 1) each, in layer_norm_backward_frame's lane order
    (``LnRowSums``; the kernel's ds and db).  work: as LnRowSums.sum's (used by one sum after the
    other); plan: an LnRowSums for x's shape to use (default: a new one)."""
    if plan is None:
        plan = LnRowSums(*x.shape, x.dtype, x.device)
    return plan.sum((dout, x, weight), work, slot=0), plan.sum((dout, weight), work, slot=1)


def ln_param_grads(dout, x, mean, rstd):
    """(Σᵢ dy·x̂, Σᵢ dy) per feature, as LayerNormBackwardKernelImplInternal
    (layer_norm_kernel.cpp) forms dweight and dbias: x̂ = fma(rstd, x, −rstd·μ); sequential over
    the rows of each thread chunk, dweight one FMA per step; the chunk partials added in opmath
    (float for float32).  mean, rstd: (N, 1)."""
    xhat = torch.addcmul(-rstd * mean, rstd, x)                 # x̂ = fma(rstd, x, −rstd·μ)
    sums = ChunkedColumnSums(x.shape[0], x.shape[1], x.dtype, x.device, x.dtype)
    return sums.dot(dout, xhat), sums.sum(dout)


# --- layer norm under autocast: the reduced-precision frame (bf16/fp16 x and dy, float32 weight) ---
def ln_mixed_row_sums(dout, x, weight):
    """(Σⱼ x·(dy·w), Σⱼ dy·w) per row (N, 1), float32, as layer_norm_backward_frame's reduced-
    precision overload sums them (dout, x: the L tensors cast up to float32; weight float32).

    It loads 2·lanes L elements at a time as two float vectors: rows of D ≥ 2·lanes accumulate
    the first half of every block in one accumulator and the second half in another (the first
    block's products start them), the partial last block into the first r lanes; then acc₀ + acc₁
    and the lane fold (shuffle tree).  Σ x·(dy·w) is contracted: acc + x·(dy·w) is one FMA per
    step (body and tail), Σ dy·w is not.  D < 2·lanes: for D > lanes the two halves are added
    lane-wise, then folded; else the lanes are added left to right.  Measured on AVX2 (8 float32
    lanes): bitwise over 60 random shapes (D 17–400) × bf16/fp16 and 12 fixed ones.  lanes 0
    (a capability not measured): plain sums."""
    lanes = ln_lanes(torch.float32, x.device)
    w = weight.expand_as(x)
    if not lanes:
        dyw = dout * w
        return (x * dyw).sum(1, keepdim=True), dyw.sum(1, keepdim=True)
    return (_ln_mixed_sum(dout * w, lanes, x), _ln_mixed_sum(dout * w, lanes))


def _ln_mixed_sum(dyw, lanes, x=None):
    """One of ln_mixed_row_sums' sums: Σ x·dyw (x given: FMA accumulation) or Σ dyw."""
    n_rows, n = dyw.shape
    prod = dyw if x is None else x * dyw
    block = 2 * lanes
    if n < block:
        if n <= lanes:
            total = prod[:, :1]
            for j in range(1, n):
                total = total + prod[:, j:j + 1]
            return total
        acc = prod[:, :lanes].clone()
        acc[:, :n - lanes] = acc[:, :n - lanes] + prod[:, lanes:]
        return _fold_lanes(acc)
    acc = [prod[:, :lanes].clone(), prod[:, lanes:block].clone()]

    def add(half, lo, hi):
        width = hi - lo
        if x is None:
            acc[half][:, :width] = acc[half][:, :width] + prod[:, lo:hi]
        else:
            acc[half][:, :width] = torch.addcmul(acc[half][:, :width], x[:, lo:hi], dyw[:, lo:hi])
    full = n - n % block
    for start in range(block, full, block):
        add(0, start, start + lanes)
        add(1, start + lanes, start + block)
    if n > full:
        add(0, full, min(n, full + lanes))
        if n > full + lanes:
            add(1, full + lanes, n)
    return _fold_lanes(acc[0] + acc[1])


def _fold_lanes(acc):
    """A float32 vector's lanes folded as vec_reduce_all's shuffle tree: lane i + lane i^(w/2), …"""
    while acc.shape[1] > 1:
        half = acc.shape[1] // 2
        acc = acc[:, :half] + acc[:, half:]
    return acc


def ln_mixed_param_grads(dout, x, mean, rstd):
    """(dweight, dbias) float32 from L dout and x, as LayerNormBackwardKernelImplInternal<T, float>
    forms them: each thread chunk of rows (thread_chunks) accumulates into a buffer of the
    *input's* type L, row by row: buf ← L(buf + dy·x̂) with x̂ = fma(rstd, x, −rstd·μ) in float
    (and buf ← L(buf + dy)), so every row's contribution is rounded to L; then the chunk buffers
    are added in float32 from 0.  Measured: bitwise at 1 and 2 threads, bf16 and fp16, 4 shapes.
    mean, rstd: (N, 1) float32."""
    low = x.dtype
    xhat = torch.addcmul(-rstd * mean, rstd, x.float())
    dyf = dout.float()
    dweight = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    dbias = torch.zeros_like(dweight)
    for lo, hi in thread_chunks(x.shape[0]):
        buf_w = torch.zeros(x.shape[1], dtype=low, device=x.device)
        buf_b = torch.zeros_like(buf_w)
        for i in range(lo, hi):
            buf_w = torch.addcmul(buf_w.float(), dyf[i], xhat[i]).to(low)
            buf_b = (buf_b.float() + dyf[i]).to(low)
        dweight, dbias = dweight + buf_w.float(), dbias + buf_b.float()
    return dweight, dbias
