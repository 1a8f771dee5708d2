"""Errors that reach the user as one readable line.

Every misconfiguration the framework can detect raises a subclass of
:class:`FlEcError`. The ServerApp, ClientApp and command-line entry points catch it
and print ``str(err)`` alone -- no traceback -- because the message already names
the problem and what to change.
"""

import logging


class FlEcError(Exception):
    """Base class: a problem the user can fix by changing config, data or setup."""


class ConfigError(FlEcError):
    """A run-config value is missing, malformed or out of range."""


class DataError(FlEcError):
    """A dataset is missing, corrupt, or cannot be split as asked."""


class ModelSpecError(FlEcError):
    """An architecture spec or a set of arrays does not describe a buildable model."""


class OneLineErrors(logging.Filter):
    """Logging filter: an :class:`FlEcError` logged with a traceback becomes one line.

    Flower logs any exception escaping a ServerApp with its full traceback. For our
    own, user-fixable errors that wall of frames hides the one line that matters, so
    this filter drops the traceback and keeps ``"fl-ec: <what to change>"``. Other
    exceptions (bugs) keep their traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, FlEcError):
            record.msg, record.args = "fl-ec error: %s", (str(exc),)
            record.exc_info, record.exc_text = None, None
        return True


def install_one_line_errors(logger_name: str = "flwr") -> None:
    """Attach :class:`OneLineErrors` to the logger (and its handlers) once."""
    logger = logging.getLogger(logger_name)
    targets = [logger, *logger.handlers]
    for target in targets:
        if not any(isinstance(f, OneLineErrors) for f in target.filters):
            target.addFilter(OneLineErrors())
