"""Errors that end a run with a one-line message instead of a traceback."""

import errno
import signal


class BatchgenError(Exception):
    """Bad config or input: reported as one line, exit code 2, before any model loads."""

    exit_code = 2


class Stopped(BaseException):  # like KeyboardInterrupt: no "except Exception" may swallow it
    """SIGINT or SIGTERM arrived: the run stops after recording what is finished; exit 128 + signal number."""

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(name)
        self.signal_name = name
        self.exit_code = 128 + signum


class OutputError(BatchgenError):
    """The run directory stopped taking writes (disk full, read-only, quota): the run stops, what is recorded stays
    valid, and the same command resumes once the disk is fixed. Exit code 1: the config was fine."""

    exit_code = 1


# errno values that mean "the output folder cannot take this write", not a bug.
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EIO, errno.EFBIG})


def output_error(e: OSError, done: int) -> OutputError:
    where = e.filename or "the run directory"
    return OutputError(
        f"cannot write {where} ({e.strerror or e}); free space or fix the output folder, then run the same command "
        f"again ({done} images recorded so far are kept)"
    )
