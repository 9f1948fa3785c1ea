"""Errors that end a run with a one-line message instead of a traceback."""

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
