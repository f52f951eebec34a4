"""The exception types the CLI turns into plain messages and exit codes instead of tracebacks."""


class UserError(Exception):
    """A problem in the user's config, files or request. The message names the field or file and the fix."""


class RunStopped(KeyboardInterrupt):
    """SIGTERM or Ctrl-C stopped a run (run.json status `stopped`). The CLI exits 128 + the signal's number, the
    shell's convention: 143 for SIGTERM, 130 for Ctrl-C. A KeyboardInterrupt, so `except Exception` never eats it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class DiskFull(UserError):
    """The disk (or the quota) ran out mid-run: one line saying where and how to go on, exit 2."""


class OutOfMemory(UserError):
    """A size too big for the memory of this machine (GPU or host), named as such instead of blamed on the data."""


_NO_SPACE_ERRNOS = (28, 122)  # ENOSPC, EDQUOT (Linux)
_NO_SPACE_WORDS = ("no space left on device", "disk quota exceeded", "storagefull", "os error 28", "os error 122")


def is_disk_full(err: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is the disk running out: an OSError with ENOSPC / EDQUOT, or
    a library's own error that carries it (safetensors' Rust writer, PyAV)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE_ERRNOS:
            return True
        if any(word in str(err).lower() for word in _NO_SPACE_WORDS):
            return True
        err = err.__cause__ or err.__context__
    return False


_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "defaultcpuallocator",
              "failed to allocate")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether an exception is an allocation failing (MemoryError, torch's OutOfMemoryError, an allocator's
    RuntimeError), not a fault of the data."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    return isinstance(err, RuntimeError) and any(word in str(err).lower() for word in _OOM_WORDS)
