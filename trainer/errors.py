"""The exception types the CLI turns into plain messages and exit codes instead of tracebacks."""


class UserError(Exception):
    """A problem in the user's config, files or request. The message names the field or file and the fix."""


class RunStopped(KeyboardInterrupt):
    """SIGTERM or Ctrl-C stopped a run (run.json status `stopped`). The CLI exits 128 + the signal's number, the
    shell's convention: 143 for SIGTERM, 130 for Ctrl-C. A KeyboardInterrupt, so `except Exception` never eats it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum
