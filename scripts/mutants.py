#!/usr/bin/env python3
"""The mutation check: plausible porting bugs, each applied alone to a temporary copy of the
project, then the suite run against it.  A mutant is *killed* when some test fails, and the first
failing test is named; a *survivor* is a bug no test sees.

    python scripts/mutants.py                 # every mutant, 2 at a time
    python scripts/mutants.py --list          # what they are
    python scripts/mutants.py --only sigmoid_textbook_order --jobs 1
    python scripts/mutants.py --record docs/mutants.md   # write the result table there (dated)

Run by hand (minutes on 2 cores; the last run is dated in docs/mutants.md), not in CI.  Each mutant names the tests to try
first (fast); when those pass, the whole suite (`tests verify`) runs, then the main job.
A mutant whose `old` text is not found exactly once is reported `stale` (the code moved: update
the mutant), never silently skipped.  `old`/`new` may be tuples of the same length: several edits
to one file, each of which must be found once (a bug in a forward and its backward together).
"""
import argparse
import concurrent.futures
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (id, file, old, new, what it models, tests to try first)
MUTANTS = []


def mutant(mid, path, old, new, what, first=()):
    MUTANTS.append({"id": mid, "file": path, "old": old, "new": new, "what": what,
                    "first": list(first)})


ACT = ["verify/test_4_activations.py", "tests/test_manual_ops.py"]
OPT = ["verify/test_losses_optimizers.py", "tests/test_losses_optim.py"]
LOSS = ["verify/test_losses_optimizers.py"]
OPS = ["tests/test_manual_ops.py"]
FAST = ["tests/test_fast.py"]
CMP = ["tests/test_compare.py", "tests/test_honest_verdicts.py"]
TRAIN = ["tests/test_train.py", "tests/test_interrupt.py"]
PORT = ["tests/test_golden.py"]

# --- manual/: layers ---------------------------------------------------------------------------
mutant("linear_addmm_split", "manual/layers.py",
       "out = torch.addmm(bias, x, weight.t())", "out = x.mm(weight.t()) + bias",
       "forward as x·Wᵀ then + b instead of one addmm", OPS + ["verify/test_8_vectorized.py"])
mutant("linear_dw_transposed", "manual/layers.py",
       "        dweight = dout.t().mm(x)\n", "        dweight = x.t().mm(dout).t()\n",
       "dW = (xᵀ·dout)ᵀ instead of doutᵀ·x", OPS + ["verify/test_8_vectorized.py"])
mutant("linear_db_gemm", "manual/layers.py",
       "dbias = dout.sum(0) if has_bias else None",
       "dbias = torch.ones(1, dout.shape[0], dtype=dout.dtype, device=dout.device).mm(dout)"
       ".squeeze(0) if has_bias else None",
       "db as a ones-vector GEMM instead of sum(0)", OPS + ["verify/test_8_vectorized.py"])
# --- manual/: activations ----------------------------------------------------------------------
mutant("sigmoid_textbook_order", "manual/activations.py",
       "dx = dout * (1 - y) * y  #", "dx = dout * y * (1 - y)  #",
       "sigmoid backward in textbook order y·(1 − y)", ACT)
mutant("tanh_unfused", "manual/activations.py",
       "dx = dout * torch.addcmul(torch.ones_like(y), y, y, value=-1)", "dx = dout * (1 - y * y)",
       "tanh backward 1 − y·y unfused (two roundings)", ACT)
mutant("relu_mask_multiply", "manual/activations.py",
       "dx = torch.where(y <= 0, 0.0, dout)", "dx = dout * (y > 0)",
       "relu backward dout·(y > 0): −0 for negative dout, NaN for infinite dout", ACT)
mutant("leaky_kink_side", "manual/activations.py",
       "dx = torch.where(x > 0, dout, dout * slope)", "dx = torch.where(x >= 0, dout, dout * slope)",
       "Leaky ReLU at x = 0 takes slope 1 instead of the slope", ACT)
mutant("elu_kink_positive", "manual/activations.py",
       "negative = x <= 0", "negative = x < 0",
       "ELU at x = 0 takes the positive branch (invisible with α = 1)", ACT)
mutant("elu_alpha_dropped", "manual/activations.py",
       "dx = torch.where(negative, dout * alpha * e, dout)",
       "dx = torch.where(negative, dout * e, dout)",
       "ELU backward forgets α (invisible with α = 1)", ACT)
# --- manual/: losses -----------------------------------------------------------------------------
mutant("mse_factor_per_row", "manual/losses.py",
       "return ((2.0 / diff.numel()) * diff) * dloss", "return ((2.0 / diff.shape[0]) * diff) * dloss",
       "mse backward 2/N (rows) instead of 2/numel", LOSS)
mutant("ce_backward_torch_exp", "manual/kernel_order.py",
       "        return sleef_exp(logp)\n", "        return torch.exp(logp)\n",
       "cross-entropy backward with torch.exp instead of the kernel's Sleef exp", LOSS)
mutant("nll_cascade_32", "manual/kernel_order.py",
       "if b & ((NLL_LEVEL_STEP - 1) << (NLL_LEVEL_POWER * j)):",
       "if b & ((2 * NLL_LEVEL_STEP - 1) << ((NLL_LEVEL_POWER + 1) * j)):",
       "nll summation cascade folding every 32 rows instead of 16",
       LOSS + ["tests/test_loss_sums.py"])
mutant("svm_margin_sign", "manual/losses.py",
       "z = (margin - y_target) + y_pred", "z = (-margin - y_target) + y_pred",
       "SVM margin with the wrong sign", LOSS)
mutant("l2_on_biases", "manual/mlp.py",
       "loss = loss + l2_forward(self._weights(), self.reg)",
       "loss = loss + l2_forward(list(self.params.values()), self.reg)",
       "L2 regularization over biases too", LOSS)
# --- manual/: optimizers ------------------------------------------------------------------------
mutant("sgd_sub_product", "manual/optim.py",
       "            p.add_(g, alpha=-self.lr)\n", "            p.sub_(self.lr * g)\n",
       "SGD step p − (lr·g) instead of add_(g, alpha=−lr)", OPT)
mutant("sgd_dampening_dropped", "manual/optim.py",
       "buf.mul_(self.momentum).add_(g, alpha=1 - self.dampening)", "buf.mul_(self.momentum).add_(g)",
       "momentum dampening ignored", OPT)
mutant("sgd_nesterov_swapped", "manual/optim.py",
       "g = g.add(buf, alpha=self.momentum) if self.nesterov else buf",
       "g = buf.add(g, alpha=self.momentum) if self.nesterov else buf",
       "Nesterov as buf + μ·g instead of g + μ·buf", OPT)
mutant("adam_bias_correction_off_by_one", "manual/optim.py",
       "t = float(self.steps[name])", "t = float(self.steps[name] + 1)",
       "Adam bias correction one step ahead", OPT)
mutant("adamw_as_l2", "manual/optim.py",
       "                if self.decoupled_weight_decay:\n",
       "                if self.decoupled_weight_decay and False:\n",
       "AdamW weight decay applied as L2 (added to the gradient)", OPT)
mutant("amsgrad_max_missing", "manual/optim.py",
       "torch.maximum(vmax, v, out=vmax)", "vmax.copy_(v)",
       "amsgrad without the running max", OPT)
mutant("adam_eps_inside_sqrt", "manual/optim.py",
       "                denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)\n",
       "                denom = (v / bias_correction2).add_(eps).sqrt()\n",
       "Adam's eps added under the square root", OPT)
# --- manual/: fast path and kernel exp ----------------------------------------------------------
mutant("fast_sgd_product", "manual/fast_optim.py",
       "_each(ADD_, params, grads, alpha=-opt.lr)",
       "_each(ADD_, params, [g * -opt.lr for g in grads])",
       "fast path SGD step p + (−lr·g) (rounded product) instead of alpha", FAST)
mutant("fast_tanh_unfused", "manual/fast_activations.py",
       "    torch.addcmul(layer.one, y, y, value=-1, out=y)\n",
       "    torch.sub(layer.one, y * y, out=y)\n",
       "fast path tanh backward 1 − y·y unfused", FAST)
mutant("fast_mse_factor", "manual/fast.py",
       "out.mul_(2.0 / out.numel())", "out.mul_(2.0 / out.shape[0])",
       "fast path mse factor 2/N instead of 2/numel", FAST)
mutant("fast_dampening_dropped", "manual/fast_optim.py",
       "_each(ADD_, bufs, grads, alpha=1 - opt.dampening)", "_each(ADD_, bufs, grads)",
       "fast path momentum dampening ignored", FAST)
mutant("kernel_exp_lane_count", "manual/kernel_exp.py",
       "step = 2 * (bits // (8 * torch.empty((), dtype=dtype).element_size()))",
       "step = bits // (8 * torch.empty((), dtype=dtype).element_size())",
       "vector-lane step of one Vec instead of two (wrong scalar tail)",
       ["tests/test_honest_verdicts.py", "verify/test_extremes.py"] + ACT)
# --- refnet/compare.py ---------------------------------------------------------------------------
mutant("compare_nan_vs_number", "refnet/compare.py",
       "| (torch.isnan(a) & torch.isnan(b))", "| (torch.isnan(a) | torch.isnan(b))",
       "NaN against a number counted as identical bits", CMP)
mutant("ulp_across_zero", "refnet/compare.py",
       "oa.abs().double() + ob.abs().double()", "(oa.abs() - ob.abs()).abs().double()",
       "ulp distance across zero as the difference of magnitudes", CMP)
mutant("curve_nan_identical", "refnet/compare.py",
       "            same = same & ~nan_steps\n", "",
       "compare_curves counting NaN steps as identical", CMP)
mutant("expected_tier_ignored", "refnet/compare.py",
       "        return bool(self.verdicts) and all(v.passed for v in self.verdicts) \\\n"
       "            and not self.short_of_expected()\n",
       "        return bool(self.verdicts) and all(v.passed for v in self.verdicts)\n",
       "a check passing below its expected tier (ulp where bitwise is promised)", CMP)
mutant("cpu_expects_tolerance", "refnet/compare.py",
       'default = "tolerance" if str(device).startswith("cuda") else "bitwise"',
       'default = "tolerance"', "the CPU expectation relaxed to tolerance", CMP)
# --- training, resume, check-port ----------------------------------------------------------------
mutant("same_permutation_every_epoch", "refnet/data.py",
       "    while len(out) < steps:\n        perm = torch.randperm(n, generator=gen)\n",
       "    perm = torch.randperm(n, generator=gen)\n    while len(out) < steps:\n",
       "mini-batches reuse one permutation every epoch", ["tests/test_honest_verdicts.py"])
mutant("resume_skips_a_batch", "refnet/harness.py",
       "datasets.batches(x.shape[0], batch_size, start + steps, seed)[start:]",
       "datasets.batches(x.shape[0], batch_size, start + steps + bool(start), seed)"
       "[start + bool(start):]",
       "a resumed run skips one batch of the schedule", TRAIN)
mutant("checkpoint_drops_optimizer_state", "refnet/checkpoint.py",
       '    pair.mlp.optimizer.load_state_dict(to_device(ck["manual_optimizer"], device))\n'
       '    pair.twin_opt.load_state_dict(ck["twin_optimizer"])\n', "",
       "resume does not restore the optimizer state (both sides: lockstep still agrees)", TRAIN)
mutant("resume_drops_dropout_stream", "refnet/checkpoint.py",
       '        pair.mlp.generator.set_state(streams["manual_rng"])\n', "        pass\n",
       "resume restarts the manual side's dropout stream (issue 26, item 2)",
       ["tests/test_train.py::test_resume_restores_every_piece_of_state"])
mutant("dp_resume_rank0_stream", "refnet/checkpoint.py",
       'streams = ck["rank_streams"][rank] if ck.get("rank_streams") else ck',
       "streams = ck",
       "data-parallel resume gives every rank rank 0's dropout stream (uneven shards differ)",
       ["verify/test_data_parallel.py::"
        "test_resume_with_dropout_batchnorm_momentum_on_uneven_shards_bitwise"])
mutant("check_port_first_16", "refnet/portcheck.py",
       'v = compare_tensors(e["name"], t, ref[e["name"]], e["kind"],',
       'v = compare_tensors(e["name"], t.reshape(-1)[:16], ref[e["name"]].reshape(-1)[:16], e["kind"],',
       "check-port compares only the first 16 elements of each tensor", PORT)

# --- issue 26: the suite's blind spots (each item's test named first) ----------------------------
mutant("eval_uses_batch_statistics", "manual/mlp.py",
       'self.buffers[f"norms.{i}.running_var"], training=self.training,',
       'self.buffers[f"norms.{i}.running_var"], training=True,',
       "the manual MLP's batch norm keeps batch statistics (and moves its running statistics) in "
       "eval (item 1)", ["tests/test_eval_mode.py"])
mutant("assert_same_ignores_tier", "refnet/api.py",
       "verdict = compare(actual, expected, name=name, tier=required, kind=kind, scale=scale)",
       "verdict = compare(actual, expected, name=name, kind=kind, scale=scale)",
       "assert_same grades at the default tier whatever tier it is given (item 3)",
       ["tests/test_api.py::test_assert_same_honours_a_stricter_tier_than_the_default"])
mutant("check_port_drops_rtol", "refnet/portcheck.py",
       'rtol=e["rtol"],\n                                atol=e["atol"]',
       'rtol=0.0,\n                                atol=e["atol"]',
       "check-port's bound is atol alone: the manifest's rtol dropped (item 4)",
       ["tests/test_golden.py::test_relative_tolerance_is_applied"])
mutant("fd_accepts_every_kink", "refnet/oracles/fd.py",
       "        elif not freeze:\n            ok[j] = False\n",
       "        elif not freeze:\n            pass\n",
       "check_backward's finite differences accept every kink coordinate (item 5)",
       ["tests/test_api.py::test_finite_differences_reject_a_wrong_value_at_a_kink",
        "tests/test_fd.py"])
mutant("report_passed_ignores_fd", "refnet/api.py",
       "\n                and (self.fd is None or self.fd.passed))", ")",
       "Report.passed ignores report.fd: autograd agreeing is enough (item 6)",
       ["tests/test_api.py::test_a_report_whose_only_failure_is_finite_differences_fails"])
mutant("check_training_moves_running_stats", "refnet/training_check.py",
       "        mlp.buffers[name].copy_(b)\n", "        pass\n",
       "check_training's extra gradient forward advances the caller's running statistics (item 7)",
       ["tests/test_check_training_state.py"])
mutant("ninja_bessel_variance", "manual/ninja.py",
       ('v["bnvar"] = 1 / n * v["bndiff2"]', 'd["bndiff2"] = (d["bnvar"] * (1 / n))'),
       ('v["bnvar"] = 1 / (n - 1) * v["bndiff2"]', 'd["bndiff2"] = (d["bnvar"] * (1 / (n - 1)))'),
       "the ninja chain normalises with Bessel's 1/(N − 1) in forward and backward alike, as the "
       "notebook does (item 8)",
       ["verify/test_norm_dropout_embedding.py::test_makemore_ninja_everything_bitwise"])

# --- issue 23: mixed precision (tests/test_main_job_mutants.py applies these two in-process and
# checks that the main job's mixed-precision examples fail) -----------------------------------------
mutant("autocast_tanh_all_bf16", "manual/autocast.py",
       '"tanh": {torch.bfloat16: _in_float32("tanh"), torch.float16: _in_float32("tanh")},',
       '"tanh": {torch.bfloat16: _in_low("tanh"), torch.float16: _in_float32("tanh")},',
       "tanh backward under bf16 autocast op by op in bfloat16 instead of float32 inside, one "
       "rounding", ["tests/test_autocast.py"])
mutant("unscale_divides", "manual/grad_scaler.py",
       "                g.mul_(inv.to(g.device))", "                g.div_(self.scale.to(g.device))",
       "GradScaler unscale g / S instead of g · float32(1 / float64(S))",
       ["tests/test_autocast.py"])


def copy_tree(dst):
    """The tracked and untracked-but-not-ignored files of the checkout, copied to dst."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, rel))


def apply(m, tree):
    path = os.path.join(tree, m["file"])
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for old, new in edits(m):
        if text.count(old) != 1:
            return False
        text = text.replace(old, new)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return True


def edits(m):
    """The mutant's (old, new) pairs: one, or several when old and new are tuples."""
    if isinstance(m["old"], tuple):
        return list(zip(m["old"], m["new"], strict=True))
    return [(m["old"], m["new"])]


FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


def _run(cmd, tree, timeout):
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        return subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def run_mutant(m, timeout):
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m['id']}-") as tree:
        copy_tree(tree)
        if not apply(m, tree):
            return {**m, "result": "stale", "by": f"{m['old']!r} not found once in {m['file']}",
                    "seconds": 0.0}
        pytest = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider"]
        stages = []
        if m["first"]:
            stages.append(("pytest " + " ".join(m["first"]), pytest + m["first"]))
        stages.append(("pytest tests verify", pytest + ["tests", "verify"]))
        stages.append(("python -m refnet", [sys.executable, "-m", "refnet", "--quiet"]))
        for label, cmd in stages:
            res = _run(cmd, tree, timeout)
            if res is None:
                return {**m, "result": "killed", "by": f"{label}: timed out after {timeout} s",
                        "seconds": round(time.time() - started, 1)}
            if res.returncode != 0:
                hit = FAILED.search(res.stdout)
                by = hit.group(1) if hit else (res.stdout.strip().splitlines() or ["?"])[-1]
                return {**m, "result": "killed", "by": f"{label}: {by}",
                        "seconds": round(time.time() - started, 1)}
        return {**m, "result": "SURVIVED", "by": "", "seconds": round(time.time() - started, 1)}


# Mutants judged equivalent (no observable difference) were removed from MUTANTS; why, by id:
EQUIVALENT = {
    "sum_squared_doubling": "(2·diff)·g vs (diff + diff)·g: doubling is exact in binary floating "
                            "point, so both give the same bits for every input",
    "l2_grad_association": "(g·2)·W vs g·(2·W): scaling by 2 is exact, so both round once, to the "
                           "same value",
    "ce_backward_reciprocal": "cross-entropy backward dloss·(1/N) instead of dloss/N: dloss is "
                              "always 1.0 (the loss is the last node; MLP.backward seeds 1, as "
                              "autograd does), so both are fl(1/N). Its run was 'killed' only by "
                              "a timing test under load (test_interrupt), not by a difference",
    "ulp_across_zero_as_difference": "|oa − ob| vs |oa| + |ob| for ordered integers of opposite "
                                     "sign: the same integer (kept instead: the difference of "
                                     "magnitudes, which is wrong)",
}


def record(path, results, seconds):
    killed = sum(r["result"] == "killed" for r in results)
    lines = ["# Mutation check", "",
             f"Last run: {datetime.date.today().isoformat()}, `python scripts/mutants.py`: "
             f"{killed}/{len(results)} killed in {seconds / 60:.1f} min "
             f"(torch {_torch_version()}, {os.cpu_count()} cores).", "",
             "Each mutant is one plausible porting bug applied alone to a temporary copy of the "
             "project; killed means a test (named) or the main job failed.", "",
             "| mutant | file | what it models | result | caught by |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| `{r['id']}` | `{r['file']}` | {r['what']} | {r['result']} | "
                     f"{r['by'].replace('|', '/')} |")
    lines += ["", "Mutants judged equivalent (no observable difference), removed from the list:", ""]
    lines += [f"- `{k}`: {v}" for k, v in EQUIVALENT.items()]
    text = "\n".join(lines) + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _torch_version():
    res = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True)
    return res.stdout.strip() or "?"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--only", nargs="+", metavar="ID", help="run these mutants only")
    p.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per stage (default 900)")
    p.add_argument("--json", metavar="OUT.json", help="write the results here")
    p.add_argument("--record", metavar="FILE.md", help="write the dated result table here")
    args = p.parse_args(argv)
    todo = MUTANTS
    if args.only:
        known = {m["id"] for m in MUTANTS}
        unknown = [i for i in args.only if i not in known]
        if unknown:
            p.error(f"--only: unknown mutant(s) {', '.join(unknown)}")
        todo = [m for m in MUTANTS if m["id"] in args.only]
    if args.list:
        for m in todo:
            print(f"{m['id']:32} {m['file']:28} {m['what']}")
        return 0
    started, results = time.time(), []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_mutant, m, args.timeout) for m in todo]
        for fut in concurrent.futures.as_completed(futures):
            r = fut.result()
            results.append(r)
            print(f"{r['result']:8} {r['id']:32} {r['seconds']:7.1f} s  {r['by']}", flush=True)
    order = {m["id"]: i for i, m in enumerate(todo)}
    results.sort(key=lambda r: order[r["id"]])
    seconds = time.time() - started
    killed = sum(r["result"] == "killed" for r in results)
    print(f"{killed}/{len(results)} mutants killed in {seconds / 60:.1f} min")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"results": results, "seconds": round(seconds, 1)}, f, indent=2)
    if args.record:
        record(args.record, results, seconds)
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
