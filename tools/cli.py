"""What every command-line tool does with errors: the expected ones (bad input, corrupt files, a full or
read-only disk, Ctrl-C) become one ``error:`` line per problem and an exit code; everything else keeps its
traceback. ``--debug`` or the environment variable SSM_TREAD_DEBUG=1 shows the traceback of every error."""
from __future__ import annotations

import argparse
import errno
import os
import sys

from ssm_tread.errors import UserError

DEBUG_ENV = "SSM_TREAD_DEBUG"
EXIT_ERROR, EXIT_ARGUMENTS, EXIT_INTERRUPTED = 1, 2, 130
DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}


def debugging() -> bool:
    return "--debug" in sys.argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def fail(message: str, code: int = EXIT_ERROR):
    for line in message.splitlines() or [""]:
        print(f"error: {line}" if line and not line.startswith(" ") else line, file=sys.stderr)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a ``--debug`` flag whose errors are one line (exit code 2)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help=f"show tracebacks (or set {DEBUG_ENV}=1)")

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)", EXIT_ARGUMENTS)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def run_tool(main, interrupted: str = "nothing was lost", expected: tuple = ()) -> None:
    """Run ``main()``, turning expected errors into one line each and an exit code (2: a bad config or
    arguments; 1: other expected errors, see UserError.exit_code; 130: Ctrl-C). ``expected``: more
    exception types that mean bad input for this tool (their first argument is the message)."""
    try:
        main()
    except KeyboardInterrupt:
        if debugging():
            raise
        fail(f"interrupted (Ctrl-C); {interrupted}", EXIT_INTERRUPTED)
    except UserError as e:
        if debugging():
            raise
        fail(str(e), e.exit_code)
    except expected as e:
        if debugging():
            raise
        fail(str(e.args[0]) if e.args else str(e))
    except OSError as e:
        if debugging() or e.errno not in DISK_ERRORS:
            raise
        if e.strerror != os.strerror(e.errno):  # the library's own message, with its fix
            fail(e.strerror)
        where = f" writing {e.filename}" if e.filename else ""
        fail(f"{DISK_ERRORS[e.errno]}{where}: free some space or choose a writable location")
