"""Atomic file writing: nothing mochi writes is ever half-written.

A file is written to a temporary name beside its target, ``.<stem>.<pid>.<random>.partial<suffix>``, and
renamed onto the target only when complete. The process id in the name lets a later run into the same
folder recognise the leftovers of a killed one (SIGKILL, power loss: no cleanup code ran) and remove them,
without touching the temporaries of a run still writing there.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from mochi.errors import write_errors

# .<stem>.<pid>.<random>.partial<suffix>; stems may hold dots, so the pid is found from the right.
_PARTIAL = re.compile(r"^\..*\.(\d+)\.[^.]+\.partial(\.[^.]+)?$")
_swept: set[str] = set()  # folders this process has cleaned of leftovers


def not_a_folder(directory: str | os.PathLike) -> str:
    """Why ``directory``, which is not a folder, cannot take files: it is missing, or something else."""
    return "is a file, not a folder" if os.path.lexists(directory) else "does not exist"


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why the folder ``folder`` cannot be made (with its parents) or written in, or None when it can: it
    "is a file", "cannot be made: '…' is a file" (one on the way), or is not writable. Checked before a
    command loads a model or starts a run, whose first write would otherwise fail minutes later."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return "is a file"
    above = next(p for p in (folder, *folder.parents) if p.exists())  # "." or "/" at the latest
    if not above.is_dir():
        return f"cannot be made: {str(above)!r} is a file"
    if not os.access(above, os.W_OK | os.X_OK):
        return "is not writable" if above == folder else f"cannot be made: {str(above)!r} is not writable"
    return None


def check_folder(path: str | os.PathLike) -> Path:
    """The folder ``path`` goes in, which must exist and take new files (ValueError naming both otherwise)."""
    directory = _writable_folder(Path(path))
    os.unlink(_new_file(Path(path), directory, ".mochi-probe.", ""))
    return directory


def _writable_folder(path: Path) -> Path:
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: folder {str(directory)!r} {not_a_folder(directory)}")
    if not os.access(directory, os.W_OK):
        raise ValueError(f"cannot write {str(path)!r}: folder {str(directory)!r} is not writable")
    return directory


def _new_file(path: Path, directory: Path, prefix: str, suffix: str) -> Path:
    """An empty new file in ``directory`` (for ``path``); a folder that takes none (/proc, a read-only mount
    seen by root: what access() cannot tell) is a ValueError naming ``path``, not the temporary name."""
    try:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    except OSError as e:
        raise ValueError(
            f"cannot write {str(path)!r}: folder {str(directory)!r} does not take new files ({e.strerror})"
        ) from None
    os.close(fd)
    return Path(name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_partial(name: str) -> bool:
    """Whether ``name`` is a temporary that ``atomic_path`` makes (a write under way, or one killed)."""
    return _PARTIAL.match(name) is not None


def safetensors_in(folder: str | os.PathLike) -> list[Path]:
    """The ``.safetensors`` files of ``folder``, sorted, without the temporaries of writes under way or
    killed (``pathlib``'s glob matches their dot-names)."""
    return sorted(p for p in Path(folder).glob("*.safetensors") if not is_partial(p.name))


def remove_stale_partials(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed mochi processes left in ``directory``; returns those removed.

    Only names of the form ``atomic_path`` makes whose process is gone are touched.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            m = _PARTIAL.match(entry.name)
            if m and entry.is_file(follow_symlinks=False) and not _alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def sweep_once(directory: str | os.PathLike) -> None:
    """``remove_stale_partials(directory)`` the first time this process writes there: the leftovers of
    killed runs all predate it, and a temporary this process names later is its own."""
    key = str(Path(directory).resolve())
    if key not in _swept:
        _swept.add(key)
        remove_stale_partials(directory)


def partial_name(stem: str, suffix: str = "") -> str:
    """A temporary's name for ``stem`` that ``remove_stale_partials`` recognises once this process is gone:
    ``.<stem>.<pid>.<random>.partial<suffix>`` (for files written in place rather than by ``atomic_path``)."""
    return f".{stem}.{os.getpid()}.{os.urandom(4).hex()}.partial{suffix}"


def umask() -> int:
    """The process's umask (read without changing it for longer than a moment)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file keeps the final suffix (``.mp4``, ``.safetensors``) so that writers which pick a
    format from the name still work. On any exception, including KeyboardInterrupt, it is removed. The
    result gets the permissions a plain ``open()`` would give (0666 less the umask).
    """
    with atomic_paths([path]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[Path, ...]]:
    """``atomic_path`` for several files published together, in the order given.

    Before the renames, any existing target but the first is removed, so that a reader never sees the new
    first file beside an old second one (a new sidecar beside an old video): if the process dies between
    the renames, a later file is missing rather than stale.
    """
    targets = [Path(p) for p in paths]
    tmps: list[Path] = []
    try:
        for path in targets:
            directory = _writable_folder(path)
            if path.is_dir():  # os.replace onto it fails late, with "Is a directory" and no rule
                raise ValueError(
                    f"cannot write {str(path)!r}: a folder has that name; move it away or give another name"
                )
            sweep_once(directory)
            # The stem is cut: a name the file system takes (255 bytes) must not fail as a longer temporary.
            stem = path.stem.encode()[:100].decode(errors="ignore")
            tmps.append(_new_file(path, directory, f".{stem}.{os.getpid()}.", f".partial{path.suffix}"))
        # A full or read-only disk is reported as such, in one line (the targets share a folder, as a rule).
        with write_errors(targets[0], tmps[0]):
            yield tuple(tmps)
            mode = 0o666 & ~umask()
            for tmp in tmps:
                # After the writer ran: mkstemp makes files private (0600), and writers that replace the file
                # themselves (safetensors writes its own temporary and renames it) undo an earlier chmod.
                os.chmod(tmp, mode)
            for path in targets[1:]:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            for tmp, path in zip(tmps, targets):
                os.replace(tmp, path)
    finally:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
