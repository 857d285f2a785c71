"""Errors a user (or the machine's state) causes, and the one line the command line reports for each.

`MochiError` is what mochi raises for a problem the user can fix: a bad value, an unreadable or foreign
file, a missing optional package, a full or read-only disk. The `mochi` command prints its message on one
line and exits 2 (`user_message`). Anything else is a bug and keeps its traceback.

Writers do not report why a write failed in a common form (safetensors wraps the OS error in its own
type, ``torch.save`` raises a bare ``RuntimeError("file write failed")``, PyAV its own errors), so
`write_errors` asks the file system instead: when a write fails and the target's file system is full or
read-only, or the file hit the process's file-size limit (``ulimit -f``), the failure is an `OutputError`
naming the file and that cause; otherwise the original exception goes on unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

# errno values that mean "this storage cannot take the write", whatever the writer.
DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EFBIG: "the file is larger than this process may write (file-size limit, see `ulimit -f`)",
}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# Below this many free bytes a failed write is put down to a full disk.
LOW_SPACE_BYTES = 16 * 2**20
# How messages name a value the user passes: as the CLI's flag ("--vae PATH") while a `mochi` command runs
# (`mochi.cli.main` sets "--"), as the Python API's argument ("vae=PATH") otherwise.
ARG_PREFIX: contextvars.ContextVar[str] = contextvars.ContextVar("mochi_arg_prefix", default="")


class MochiError(Exception):
    """A problem the user can fix; its message is one line naming the value or file and what to do."""


class OutputError(MochiError):
    """A file could not be written because of where it goes: full disk, read-only file system, size limit."""


class MissingPackageError(MochiError, ImportError):
    """An option needs an optional package that is not installed; the message says how to install it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds (and cleans up) as Ctrl-C does; the CLI
    exits 143 on it (130 on Ctrl-C)."""


def one_line(text: str) -> str:
    """``text`` with its lines joined, so that a message from a library never spans several lines."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def listing(keys: Iterable[str], limit: int = 12) -> str:
    """``keys`` sorted and joined by commas, the first ``limit`` of them, then how many more."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def user_message(exc: BaseException) -> str | None:
    """The one-line report of an error the user or the machine caused, or None for a bug.

    User errors: `MochiError`, ``ValueError`` (bad input, everywhere in mochi), ``OSError`` (files and
    disks: missing, not permitted, already there, full, read-only) and running out of memory
    (`out_of_memory`).
    """
    if isinstance(exc, OSError) and not isinstance(exc, MochiError):
        return _os_message(exc)
    if (oom := out_of_memory(exc)) is not None:
        return oom
    if isinstance(exc, (MochiError, ValueError)):
        return one_line(str(exc)) or type(exc).__name__
    return None


# torch's CPU allocator reports failure as a bare RuntimeError; CUDA's is torch.OutOfMemoryError.
_CPU_ALLOC = re.compile(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes")
_CUDA_ALLOC = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")


def out_of_memory(exc: BaseException) -> str | None:
    """The one-line report of a failed allocation (CPU or accelerator), or None for any other error.

    How much memory a request needs depends on the model, the size and the options, so the line says what
    shrinks it rather than a limit."""
    is_oom = type(exc).__name__ == "OutOfMemoryError" and isinstance(exc, RuntimeError)
    cpu = _CPU_ALLOC.search(str(exc)) if isinstance(exc, RuntimeError) else None
    if not (is_oom or cpu):
        return None
    if cpu:
        what = f"the CPU could not allocate {int(cpu.group(1)) / 1e9:.1f} GB"
    else:
        size = _CUDA_ALLOC.search(str(exc))
        what = "the accelerator could not allocate " + (size.group(1) if size else "more memory")
    return (
        f"out of memory: {what}; use fewer frames or a smaller size, or lower the memory it takes "
        "(--offload, --quantize, --dtype bf16; `mochi plan` says what fits)"
    )


def _os_message(exc: OSError) -> str:
    if exc.strerror is None:
        return one_line(str(exc)) or type(exc).__name__
    # A rename names the temporary and the destination: the destination is the path the user chose.
    named = exc.filename2 if exc.filename2 is not None else exc.filename
    name = repr(os.fspath(named)) if named is not None else ""
    reason = DISK_ERRNOS.get(exc.errno, exc.strerror)
    if isinstance(exc, FileExistsError):
        return f"{name or 'the output'} already exists; remove it or choose another path"
    if exc.errno in DISK_ERRNOS:
        return f"cannot write {name or 'the output'}: {reason}"
    return f"{reason}: {name}" if name else reason


def disk_trouble(path: str | os.PathLike) -> str | None:
    """Why ``path``'s file system cannot take writes now (full, read-only, file-size limit), or None."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        st = os.statvfs(folder if str(folder) else ".")
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return DISK_ERRNOS[errno.EROFS]
    if st.f_bavail * st.f_frsize < LOW_SPACE_BYTES:
        return f"{DISK_ERRNOS[errno.ENOSPC]} ({st.f_bavail * st.f_frsize:,} bytes free)"
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource

        limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if limit != resource.RLIM_INFINITY and path.is_file() and path.stat().st_size >= limit:
            return DISK_ERRNOS[errno.EFBIG]
    return None


def _errno_of(exc: BaseException) -> int | None:
    """The errno of ``exc``, of an exception it was raised from, or in its text as Rust libraries (such as
    safetensors) write it: "... (os error 28)"."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        if m := _RUST_OS_ERROR.search(str(exc)):
            return int(m.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def write_errors(target: str | os.PathLike, written: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn a failed write of ``target`` into an `OutputError` when the storage is to blame.

    written: the file actually being written (a temporary beside ``target``), checked against the file-size
    limit. A `MochiError`, an interruption, or a failure with no storage cause propagates unchanged.
    """
    try:
        yield
    except MochiError:
        raise
    except Exception as e:
        code = _errno_of(e)
        reason = DISK_ERRNOS.get(code) if code is not None else None
        reason = reason or disk_trouble(written if written is not None else target)
        if reason is None:
            raise
        raise OutputError(f"cannot write {os.fspath(target)!r}: {reason}") from e
