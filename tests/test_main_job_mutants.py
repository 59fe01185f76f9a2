"""Issue 23's done-when: the main job (`python -m refnet`, here `refnet verify` over its
mixed-precision examples) fails when (a) the tanh backward under bf16 autocast runs all in
bfloat16, (b) the GradScaler's unscale divides by S instead of multiplying by float32(1/S).

Each mutant is taken from scripts/mutants.py (its old → new text, so the mutation table and this
test model the same bug) and applied in-process: the mutated module's source is executed into a
fresh namespace, and what changed is patched onto the live objects (a dict's entries, a class's
methods), so every module that imported them sees the mutant.  monkeypatch undoes it.
"""
import importlib
import importlib.util
import pathlib
import types

import pytest

from refnet import cli
from refnet.cli.common import EXIT_FAILED

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ["autocast_activations", "spiral_bf16", "circles_fp16_scaler"]


def _mutants():
    spec = importlib.util.spec_from_file_location("_mutants", ROOT / "scripts" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {m["id"]: m for m in module.MUTANTS}


def apply_in_process(monkeypatch, m):
    """Execute the mutated source of m's file; patch each top-level dict entry and class method
    that differs onto the live module's objects."""
    text = (ROOT / m["file"]).read_text(encoding="utf-8")
    assert text.count(m["old"]) == 1, f"{m['id']}: stale (old text not found once)"
    live = importlib.import_module(m["file"][:-3].replace("/", "."))
    fresh = types.ModuleType(live.__name__)
    fresh.__file__ = live.__file__
    exec(compile(text.replace(m["old"], m["new"]), live.__file__, "exec"), fresh.__dict__)
    patched = []
    for name, new in vars(fresh).items():
        old = getattr(live, name, None)
        if isinstance(old, dict) and isinstance(new, dict):
            for key in old:
                if _source_differs(old[key], new[key]):
                    monkeypatch.setitem(old, key, new[key])
                    patched.append(f"{name}[{key!r}]")
        elif isinstance(old, type) and getattr(old, "__module__", None) == live.__name__:
            for attr, fn in vars(new).items():
                if isinstance(fn, types.FunctionType) and _source_differs(vars(old)[attr], fn):
                    monkeypatch.setattr(old, attr, fn)
                    patched.append(f"{name}.{attr}")
    assert patched, f"{m['id']}: the edit changed no dict entry or method"
    return patched


def _source_differs(a, b):
    """Whether two values built by the module differ in their code (for nested dicts of closures:
    compare the code and closure cell contents' code)."""
    if isinstance(a, dict):
        return any(_source_differs(a[k], b[k]) for k in a)
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    if code_a is None:
        return False
    if code_a.co_code != code_b.co_code or code_a.co_consts != code_b.co_consts:
        return True
    cells = zip(a.__closure__ or (), b.__closure__ or ())
    return any(ca.cell_contents != cb.cell_contents for ca, cb in cells
               if not callable(ca.cell_contents))


def main_job(capsys):
    """`refnet verify` over the mixed-precision examples on the CPU: (exit code, output)."""
    code = cli.main(["verify", "--device", "cpu", "--dtype", "float32", "--example", *EXAMPLES])
    return code, capsys.readouterr().out


def test_unpatched_main_job_passes(capsys):
    code, out = main_job(capsys)
    assert code == 0 and " FAIL" not in out, out


@pytest.mark.parametrize("mid, failing_row", [
    ("autocast_tanh_all_bf16", "bfloat16.tanh"),
    ("unscale_divides", "float16."),
])
def test_main_job_fails_under_the_mutant(monkeypatch, capsys, mid, failing_row):
    patched = apply_in_process(monkeypatch, _mutants()[mid])
    code, out = main_job(capsys)
    failed = [line for line in out.splitlines() if line.rstrip().endswith("FAIL")]
    assert code == EXIT_FAILED and any(failing_row in line for line in failed), out
    print(f"{mid} (patched {', '.join(patched)}):\n" + "\n".join(failed))
