"""The one exception type for mistakes a user can make (a path, layer index, YAML key, URL).

The CLI turns it into a single sentence and a non-zero exit; everything else is a bug and keeps
its traceback.
"""


class AutolayerError(Exception):
    """A user-caused error whose message is one clear sentence."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (raised by the CLI's signal handlers).

    A BaseException but not a KeyboardInterrupt: Lightning answers KeyboardInterrupt with
    `sys.exit(1)` and nothing printed, while it tears down and re-raises anything else.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class TrialInterrupted(KeyboardInterrupt):
    """An interrupted trial, as Optuna understands it: it marks the trial FAIL and re-raises."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
