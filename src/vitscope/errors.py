"""The one exception type a user can cause; the CLI turns it into one line on stderr and exit 2."""


class VitscopeError(Exception):
    """A user error: bad flag, unreadable file, missing run, failed checksum, no network.

    Programming errors are not wrapped in this: they stay tracebacks.
    """
