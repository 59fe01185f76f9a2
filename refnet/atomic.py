"""Atomic file writes: a temporary file in the destination's folder, then os.replace.

A reader sees the old file or the new one, never half of one; a failure (or Ctrl-C) leaves no
temporary file behind.
"""
import os
import tempfile

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path, write):
    """Call write(binary file object) on a temp file beside `path`, fsync it, rename it to `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text):
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
