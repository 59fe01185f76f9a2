"""manual/ imports torch and math only, and never uses autograd or an aten *_backward kernel."""
import ast
import io
import pathlib
import re
import tokenize

MANUAL = pathlib.Path(__file__).resolve().parent.parent / "manual"
FORBIDDEN = [r"\bautograd\b", r"\.backward\(", r"torch\.[\w.]*_backward", r"requires_grad",
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
    """The source with comments and string literals (docstrings) blanked in place: same lines,
    same columns, so `torch.ops.aten.x_backward(` still reads as written."""
    lines = [list(line) for line in source.splitlines(keepends=True)]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.STRING):
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        for row in range(r0, r1 + 1):
            line = lines[row - 1]
            start = c0 if row == r0 else 0
            stop = c1 if row == r1 else len(line)
            for col in range(start, stop):
                if line[col] != "\n":
                    line[col] = " "
    return "".join("".join(line) for line in lines)


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
    for bad in ("import torch\ndef f(x):\n    return torch.ops.aten.tanh_backward(x, x)\n",
                "def f(loss):\n    loss.backward()\n", "def f(x):\n    return x.grad\n",
                "def f(x):\n    return torch._log_softmax_backward_data(x, x, 1, x.dtype)\n"):
        assert any(re.search(p, code_only(bad)) for p in FORBIDDEN), bad
    fine = 'def f(self, cache):\n    """no loss.backward() here"""  # nor x.grad\n    return self.backprop(cache)\n'
    assert not any(re.search(p, code_only(fine)) for p in FORBIDDEN)
