"""User-facing failures: one line on stderr, exit code 2, no traceback (unless --debug)."""

import errno


class KtqError(Exception):
    """A problem with the input, the options or the machine that the user can fix.

    The message is shown as it is, on one line: say what is wrong and what to do about it.
    """

    exit_code = 2


class Interrupted(KtqError):
    """Ctrl-C while an output was being written: the message says how the work continues."""

    exit_code = 130


def write_error(path: object, exc: OSError) -> KtqError:
    """An OSError of a write as a KtqError that names the file and says what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return KtqError(f"cannot write {path}: {exc.strerror} (the disk is full): free some space and re-run the "
                        "same command, it continues where it stopped")
    return KtqError(f"cannot write {path}: {exc.strerror or exc}")
