"""What every command-line tool does with errors: the expected ones (bad input, corrupt files, a full or
read-only disk, Ctrl-C) become one ``error:`` line per problem and an exit code; everything else keeps its
traceback. ``--debug`` or the environment variable SSM_TREAD_DEBUG=1 shows the traceback of every error."""
from __future__ import annotations

import errno
import os
import sys

from ssm_tread.errors import UserError

DEBUG_ENV = "SSM_TREAD_DEBUG"
EXIT_ERROR, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130
DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}


def debugging() -> bool:
    return "--debug" in sys.argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def fail(message: str, code: int = EXIT_ERROR):
    for line in message.splitlines() or [""]:
        print(f"error: {line}" if line and not line.startswith(" ") else line, file=sys.stderr)
    sys.exit(code)


def run_tool(main, interrupted: str = "nothing was lost") -> None:
    """Run ``main()``, turning expected errors into one line each and an exit code (2: a bad config or
    arguments; 1: other expected errors; 130: Ctrl-C)."""
    from ssm_tread.train.config import ConfigError

    try:
        main()
    except KeyboardInterrupt:
        if debugging():
            raise
        fail(f"interrupted (Ctrl-C); {interrupted}", EXIT_INTERRUPTED)
    except UserError as e:
        if debugging():
            raise
        fail(str(e), EXIT_CONFIG if isinstance(e, ConfigError) else EXIT_ERROR)
    except OSError as e:
        if debugging() or e.errno not in DISK_ERRORS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        fail(f"{DISK_ERRORS[e.errno]}{where}: {e.strerror}; free some space or choose a writable location "
             f"(run with --debug for the traceback)")
