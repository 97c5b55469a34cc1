"""What every command-line tool does with errors: the expected ones (bad input, corrupt files, a full or
read-only disk, Ctrl-C) become one ``error:`` line per problem and an exit code; everything else keeps its
traceback. ``--debug`` or the environment variable SSM_TREAD_DEBUG=1 shows the traceback of every error.

Under torchrun every rank reads the same input and meets the same expected error, so only rank 0 prints
it (every rank exits with its code); a full or read-only disk is printed by every rank it hits, a problem
of a node's own files (a node-local data.root) by the first rank of every node. Once a
tool is exiting, a further Ctrl-C ends the process at once and quietly (exit code 130) instead of
interrupting the interpreter's clean-up with a traceback."""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys

from ssm_tread.errors import UserError

DEBUG_ENV = "SSM_TREAD_DEBUG"
EXIT_ERROR, EXIT_ARGUMENTS, EXIT_INTERRUPTED = 1, 2, 130
DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}


def debugging() -> bool:
    return "--debug" in sys.argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


PATH_ERRORS = {errno.ENOENT: "does not exist", errno.ENOTDIR: "is not a path: a part of it is a file",
               errno.EISDIR: "is a folder, not a file"}


def rank() -> int:
    """This process's rank under torchrun (0 on its own)."""
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """This process's rank on its node under torchrun (0 on its own)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def fail(message: str, code: int = EXIT_ERROR, every_rank: bool = False):
    """Print ``message`` as ``error:`` lines (on rank 0 only, unless ``every_rank``) and exit with ``code``."""
    if every_rank or rank() == 0:
        prefix = f"rank {rank()}: " if rank() else ""
        for line in message.splitlines() or [""]:
            print(f"error: {prefix}{line}" if line and not line.startswith(" ") else line, file=sys.stderr)
    sys.exit(code)


def describe(error: Exception) -> str:
    """The message of an expected error: its own, or for an OS error about a path, the path and what is wrong."""
    if isinstance(error, OSError) and error.errno is not None:
        what = PATH_ERRORS.get(error.errno, error.strerror)
        return f"{error.filename}: {what}; check the path" if error.filename else what
    return str(error.args[0]) if error.args else str(error)


def _exit_quietly(signum, frame):
    os._exit(EXIT_INTERRUPTED)


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
    exception types that mean bad input for this tool (their message, or for an OS error, its path and
    what is wrong)."""
    try:
        _run(main, interrupted, expected)
    finally:  # exiting now: a Ctrl-C during the interpreter's clean-up (atexit) ends it without a traceback
        signal.signal(signal.SIGINT, _exit_quietly)


def _run(main, interrupted: str, expected: tuple) -> None:
    try:
        main()
    except KeyboardInterrupt:
        if debugging():
            raise
        fail(f"interrupted (Ctrl-C); {interrupted}", EXIT_INTERRUPTED)
    except UserError as e:
        if debugging():
            raise
        fail(str(e), e.exit_code, every_rank=e.node_local and local_rank() == 0)
    except expected as e:
        if debugging():
            raise
        fail(describe(e))
    except OSError as e:
        if debugging() or e.errno not in DISK_ERRORS:
            raise
        if e.strerror != os.strerror(e.errno):  # the library's own message, with its fix
            fail(e.strerror, every_rank=True)
        where = f" writing {e.filename}" if e.filename else ""
        fail(f"{DISK_ERRORS[e.errno]}{where}: free some space or choose a writable location", every_rank=True)
