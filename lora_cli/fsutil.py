"""Files that are either whole or absent, and questions asked of the file system before work.

Every artifact `lora` writes goes to a temporary name beside its target and is renamed into place,
so a kill, a crash or a full disk at any moment leaves the old file (or directory) or the new one,
never half of one. Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_file(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `target` to write (by any means); on success it replaces
    `target`, on an exception it is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _default_permissions(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that a crash leaves either the old file or the new one."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it replaces `target` whole.

    On an exception the temporary directory is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _default_permissions(tmp)
    if target.exists() and _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old contents
        return
    # Without an atomic exchange there is a moment with no `target`: the old one is kept under a
    # hidden name until the new one is in place.
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _default_permissions(path: Path) -> None:
    """What a plain open()/mkdir() would have given (mkstemp and mkdtemp make them private to their
    owner): an exported model must be readable by e.g. the Ollama server's own user."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE): a kill at any moment
    leaves either the old `b` or the new one. False where the system cannot do it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def cannot_write_in(directory: Path, name: str = "probe") -> OSError | None:
    """Why nothing can be created in `directory` (created if missing), or None when it can:
    asked before minutes of work whose result goes there, not after. Tries what the atomic
    writers above do: a file and a directory with hidden names, removed again."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{name}.probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
        os.rmdir(tempfile.mkdtemp(prefix=f".{name}.probe-", dir=directory))
    except OSError as e:
        return e
    return None


def absolute_if_exists(spec: Any) -> Any:
    """A path that exists here, made absolute; anything else (a hub id, a missing file) as it is."""
    if not isinstance(spec, str) or not Path(spec).expanduser().exists():
        return spec
    return str(Path(spec).expanduser().resolve())
