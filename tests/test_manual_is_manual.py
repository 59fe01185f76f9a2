"""manual/ imports torch and math only, and never uses autograd or an aten *_backward kernel."""
import ast
import io
import pathlib
import re
import tokenize

MANUAL = pathlib.Path(__file__).resolve().parent.parent / "manual"
FORBIDDEN = [r"\bautograd\b", r"(?<!self)\.backward\(", r"torch\.[\w.]*_backward", r"requires_grad",
             r"torch\.ops\b", r"\bgrad_fn\b", r"enable_grad", r"torch\.func\b", r"functorch",
             r"\.grad\b"]


def sources():
    files = sorted(MANUAL.glob("*.py"))
    assert files, "manual/ has no sources"
    return files


def test_imports_are_torch_math_or_manual():
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for n in names:
                root = n.split(".")[0]
                assert root in ("torch", "math", "manual"), f"{path.name} imports {n}"


def code_only(source):
    """The source with comments and string literals (docstrings) blanked out, lines kept."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            continue
        out.append((tok.start, tok.string))
    lines = [""] * (source.count("\n") + 2)
    for (row, _), text in out:
        lines[row - 1] += text + " "
    return "\n".join(lines)


def test_no_autograd_anywhere():
    for path in sources():
        code = code_only(path.read_text())
        for pattern in FORBIDDEN:
            m = re.search(pattern, code)
            if m:
                line = code[:m.start()].count("\n") + 1
                raise AssertionError(f"{path.name}:{line} uses {pattern!r}: "
                                     f"{code.splitlines()[line - 1].strip()}")


def test_the_check_can_fail(tmp_path):
    bad = "import torch\ndef f(x):\n    return torch.ops.aten.tanh_backward(x, x)\n"
    assert any(re.search(p, bad) for p in FORBIDDEN)
    assert not any(re.search(p, "grads, _ = self.backward(cache)\n") for p in FORBIDDEN)
