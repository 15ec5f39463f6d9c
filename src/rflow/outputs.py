"""One rule for everything rflow writes: checked before the work, written beside, swapped in on success.

* :func:`check_output` runs before any work: the path must have the right suffix, an existing output
  is replaced only with ``force`` (or kept and extended with ``append``, where that is the verb's
  meaning), a file output must not be a folder and a folder output not a file, and the nearest
  existing parent must be a writable folder. Missing parent folders are created when writing starts.
* :func:`replacing` yields a temporary sibling (``.NAME.rflow-tmp-PID``, a file or a folder) to write
  into; when the block ends without an exception the sibling takes the output's place — a folder is
  swapped atomically with ``renameat2(RENAME_EXCHANGE)`` where Linux offers it — and on any exception,
  Ctrl-C included, the sibling is removed and the earlier output stays byte-identical. A run killed
  outright (SIGKILL) leaves only a hidden sibling behind, which the next write to that output removes.
* :func:`atomic_write_bytes` is :func:`replacing` for bytes already in memory.
* :func:`request_interrupt` records a Ctrl-C that may have been swallowed (Python drops an exception
  raised inside a ``__del__``); from then on no output is swapped in — the swap raises
  ``KeyboardInterrupt`` instead — until :func:`clear_interrupt`. :func:`committed` lists the outputs
  swapped in since :func:`start_run`, so a Ctrl-C that lands after an output is in place can say so.
* Files swapped in get the usual ``0666 & ~umask`` mode, whatever the writer of the sibling chose.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import UserError, flag

TMP_TAG = ".rflow-tmp-"

_interrupted = False
_committed: list[str] = []  # outputs swapped in since start_run(): an interrupt after them did not stop them


def request_interrupt() -> None:
    """Note a Ctrl-C: every later swap refuses (raises KeyboardInterrupt) until :func:`clear_interrupt`."""
    global _interrupted
    _interrupted = True


def interrupt_requested() -> bool:
    """Whether a Ctrl-C / SIGTERM was noted since the run started (see :func:`request_interrupt`)."""
    return _interrupted


def clear_interrupt() -> None:
    global _interrupted
    _interrupted = False


def start_run() -> None:
    """Forget earlier interrupts and swapped-in outputs (a command starts)."""
    clear_interrupt()
    _committed.clear()


def committed() -> list[str]:
    """The outputs swapped in since :func:`start_run`, in order."""
    return list(_committed)


def interrupt_requested() -> bool:
    return _interrupted


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C was noted, even one that Python swallowed."""
    if _interrupted:
        raise KeyboardInterrupt


def check_output(path: str | os.PathLike, *, kind: str = "file", suffixes: tuple[str, ...] = (), force: bool = False,
                 append: bool = False, can_append: bool = False, what: str = "output") -> Path:
    """Validate an output path before any work; returns it with ``~`` expanded.

    ``kind``: "file" or "dir". ``suffixes``: allowed file suffixes (lower case, with the dot). An
    existing output is refused unless ``force`` or ``append``; an empty existing folder counts as new.
    """
    p = Path(path).expanduser()
    if suffixes and p.suffix.lower() not in suffixes:
        raise UserError(f"{p}: {what} must be a {' or '.join(suffixes)} file")
    if p.name in ("", ".", ".."):
        raise UserError(f"{p}: not a usable {what} name")
    if p.exists() or p.is_symlink():
        if kind == "file" and p.is_dir():
            raise UserError(f"{p}: is a directory; {what} must be a file path")
        if kind == "dir" and not p.is_dir():
            raise UserError(f"{p}: exists and is not a folder; {what} must be a folder")
        empty_dir = kind == "dir" and p.is_dir() and not any(p.iterdir())
        if not (force or append or empty_dir):
            how = f"{flag('append', switch=True)} to add to it or {flag('force', switch=True)} to replace it" if can_append else \
                f"{flag('force', switch=True)} to replace it"
            raise UserError(f"{p} already exists: pass {how}, or choose another path")
    elif append:
        raise UserError(f"{p}: no such {what.removeprefix('the ')} to add to")
    parent = p.parent.resolve() if p.parent != Path("") else Path.cwd()
    anc = parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{anc}: is not a directory, so {p} cannot be written")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"{anc}: no permission to write there")
    return p


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def remove_stale_siblings(path: Path) -> None:
    """Remove temporary siblings of ``path`` left by killed rflow processes."""
    prefix = f".{path.name}{TMP_TAG}"
    with contextlib.suppress(OSError):
        for q in path.parent.iterdir():
            if q.name.startswith(prefix):
                pid = q.name[len(prefix):]
                if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                    _remove(q)


def _fsync_path(p: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _umask() -> int:
    try:  # Linux ≥ 4.7 reports it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _default_modes(tmp: Path, kind: str) -> None:
    """Give written files ``0666 & ~umask`` (folders ``0777 & ~umask``): writers that go through
    ``mkstemp`` leave 0600, which would make one output of a run private and the rest not."""
    mask = _umask()
    if kind == "file":
        if tmp.is_file() and not tmp.is_symlink():
            os.chmod(tmp, 0o666 & ~mask)
        return
    for root, dirs, files in os.walk(tmp):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            f = Path(root) / name
            if f.is_file() and not f.is_symlink():
                os.chmod(f, 0o666 & ~mask)


def _commit(tmp: Path, dst: Path, kind: str) -> None:
    def swapped() -> None:  # in place from here on: an interrupt now must not claim otherwise
        _committed.append(str(dst))

    if kind == "file":
        _fsync_path(tmp)
        os.replace(tmp, dst)
        swapped()
    elif dst.exists():
        if not dst.is_dir() or dst.is_symlink():
            _remove(dst)
            os.rename(tmp, dst)
            swapped()
        elif _exchange(tmp, dst):
            swapped()
            _remove(tmp)  # now holds the earlier output
        else:  # two renames: the earlier output is gone only once the new one is complete
            old = dst.with_name(f".{dst.name}.rflow-old-{os.getpid()}")
            _remove(old)
            os.rename(dst, old)
            os.rename(tmp, dst)
            swapped()
            _remove(old)
    else:
        os.rename(tmp, dst)
        swapped()
    _fsync_path(dst.parent)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, kind: str = "file") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write into (a new empty folder when ``kind`` is "dir");
    it replaces ``path`` when the block succeeds and is removed when it raises (Ctrl-C included)."""
    with replacing_all([path], kinds=[kind]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def replacing_all(paths: list, kinds: list[str] | None = None) -> Iterator[list[Path]]:
    """:func:`replacing` for several outputs written together; all are swapped in only if all succeed."""
    dsts = [Path(p).expanduser() for p in paths]
    kinds = kinds or ["file"] * len(dsts)
    tmps = []
    try:
        for dst, kind in zip(dsts, kinds):
            dst.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_siblings(dst)
            tmp = _tmp_sibling(dst)
            _remove(tmp)
            if kind == "dir":
                tmp.mkdir()
            tmps.append(tmp)
        yield tmps
        check_interrupt()
        for tmp, kind in zip(tmps, kinds):
            _default_modes(tmp, kind)
        for tmp, dst, kind in zip(tmps, dsts, kinds):
            _commit(tmp, dst, kind)
    finally:
        for tmp in tmps:
            if tmp.exists() or tmp.is_symlink():
                _remove(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename: never half a file."""
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
