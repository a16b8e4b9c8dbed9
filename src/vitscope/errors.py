"""The one exception type a user can cause; the CLI turns it into one line on stderr and exit 2. And the way a
training run stops on SIGINT or SIGTERM."""


class VitscopeError(Exception):
    """A user error: bad flag, unreadable file, missing run, failed checksum, no network.

    Programming errors are not wrapped in this: they stay tracebacks.
    """


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM, its message saying what was saved. A KeyboardInterrupt, not an
    Exception, so that no `except Exception` on the way (a compile falling back to eager) takes it for a failure.
    The CLI exits with 128 + the signal's number, as a shell reports a process the signal ended: 130, 143."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.message = signum, message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
