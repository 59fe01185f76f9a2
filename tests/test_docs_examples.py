"""Run the worked examples of docs/examples/ (public API only) and the copyable example of
docs/check-api.md as part of the suite.

Each example file is a pytest test file of its own (`pytest docs/examples/cs231n_layers.py`); here
its test functions are loaded and collected under this module, so they run in every suite run.
"""
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.py"))
EXPECTED = {"cs231n_layers", "cs231n_numpy", "backprop_ninja", "custom_function"}


def _load(path):
    spec = importlib.util.spec_from_file_location(f"refnet_docs_example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


for _path in EXAMPLES:
    for _name, _fn in vars(_load(_path)).items():
        if _name.startswith("test_") and callable(_fn):
            globals()[f"test_{_path.stem}__{_name[5:]}"] = _fn


def test_the_worked_examples_are_there():
    assert EXPECTED <= {p.stem for p in EXAMPLES}


def test_examples_use_only_the_public_api():
    for path in EXAMPLES:
        imports = re.findall(r"^\s*(?:from|import) +([\w.]+)", path.read_text(encoding="utf-8"), re.M)
        private = [m for m in imports if m.startswith(("refnet.", "manual"))]
        assert not private, f"{path.name} imports {private}; the examples use `import refnet` only"


def python_blocks():
    """The ```python blocks of docs/check-api.md (```py blocks are fragments, not run)."""
    text = (ROOT / "docs" / "check-api.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2, "docs/check-api.md: expected the copyable and the MLP example"
    return blocks


def check_api_example():
    return python_blocks()[0]


def test_check_api_md_mlp_example_runs(capsys):
    exec(compile(python_blocks()[1], "docs/check-api.md (MLP)", "exec"), {})
    out = capsys.readouterr().out
    assert "completed identical" in out and "'layers.0.weight'" in out


def test_check_api_md_example_runs_and_is_short():
    code = check_api_example()
    lines = [ln for ln in code.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert len(lines) <= 12, f"the copyable example has {len(lines)} lines"
    namespace = {}
    exec(compile(code, "docs/check-api.md", "exec"), namespace)
    tests = [fn for name, fn in namespace.items() if name.startswith("test_")]
    assert tests, "the example defines a test function"
    for fn in tests:
        fn()


def test_check_api_md_example_fails_loudly_when_the_backward_is_wrong():
    # The same example with the transpose dropped from dw's formula must not pass silently.
    code = check_api_example()
    assert "x.T @ dout" in code
    broken = code.replace("x.T @ dout", "(x.T @ dout) * 1.001")
    namespace = {}
    exec(compile(broken, "docs/check-api.md (broken)", "exec"), namespace)
    fn = next(fn for name, fn in namespace.items() if name.startswith("test_"))
    with pytest.raises(AssertionError, match=r"dw is 'fail'.*\n.*shape \[5, 3\]"):
        fn()


def test_readme_python_block_runs_and_catches_a_wrong_backward():
    """README.md's tour shows one ```python block: it runs as printed, and with dw wrong it fails."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    exec(compile(code, "README.md", "exec"), {})
    broken = code.replace("x.T @ dout", "(x.T @ dout) * 1.001")
    assert broken != code
    with pytest.raises(AssertionError, match=r"dw is 'fail'"):
        exec(compile(broken, "README.md (broken)", "exec"), {})
