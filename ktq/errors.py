"""User-facing failures: one line on stderr, exit code 2, no traceback (unless --debug)."""


class KtqError(Exception):
    """A problem with the input, the options or the machine that the user can fix.

    The message is shown as it is, on one line: say what is wrong and what to do about it.
    """

    exit_code = 2
