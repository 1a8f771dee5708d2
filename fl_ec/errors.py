"""Errors that reach the user as one readable line.

Every misconfiguration the framework can detect raises a subclass of
:class:`FlEcError`. The ServerApp, ClientApp and command-line entry points catch it
and print ``str(err)`` alone -- no traceback -- because the message already names
the problem and what to change.
"""

import logging
from collections.abc import Callable, Iterable
from typing import Any


class FlEcError(Exception):
    """Base class: a problem the user can fix by changing config, data or setup."""


class ConfigError(FlEcError):
    """A run-config value is missing, malformed or out of range."""


class DataError(FlEcError):
    """A dataset is missing, corrupt, or cannot be split as asked."""


class ModelSpecError(FlEcError):
    """An architecture spec or a set of arrays does not describe a buildable model."""


class SettingError(FlEcError, ValueError):
    """A settings object's field holds a value it cannot work with.

    Settings dataclasses raise it from their own checks, so each rule lives next to
    the field it guards. ``str()`` is one line: ``"<owner>.<field>=<value> <reason>"``,
    ``reason`` saying what to change. :class:`~fl_ec.config.ExperimentConfig` re-raises
    it as a :class:`ConfigError` that names the run-config key the field came from.
    It subclasses ``ValueError`` too, which library callers of a settings class catch.
    """

    def __init__(self, owner: str, field: str, value: Any, reason: str) -> None:
        self.owner, self.field, self.value, self.reason = owner, field, value, reason
        name = f"{owner}.{field}" if owner else field
        super().__init__(f"{name}={value!r} {reason}")


def accepts(check: Callable[[Any], object], value: Any) -> bool:
    """Whether ``check(value)`` returns without a ``ValueError``: a parser or checker
    that raises used as one of :func:`check_fields`' conditions."""
    try:
        check(value)
    except ValueError:
        return False
    return True


def one_of(options: Iterable[str]) -> str:
    """A :class:`SettingError` reason for a value outside ``options``."""
    return f"is unknown: choose one of {', '.join(options)}"


def check_fields(settings: object, checks: Iterable[tuple[str, bool, str]]) -> None:
    """Raise :class:`SettingError` for the first ``(field, ok, reason)`` that is not ``ok``.

    The error names ``settings``' class and the field's current value.
    """
    for field, ok, reason in checks:
        if not ok:
            raise SettingError(type(settings).__name__, field, getattr(settings, field), reason)


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
