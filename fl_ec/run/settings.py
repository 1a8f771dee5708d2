"""Where a run's folder goes, whether it resumes, and where its rounds are tracked.

:class:`OutputSection` is the run-config's ``results-dir``, ``run-name``, ``resume`` and
``tracking``: the keys that fl-ec's ServerApp reads, and that
:class:`~fl_ec.run.recorded.RecordedRun` reads from any app's run-config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fl_ec.errors import ConfigError, SettingError, check_fields, one_of
from fl_ec.run.tracking import TRACKERS

# What a resumed run may set differently from the run it continues.
RESUME_MAY_CHANGE = (
    "resume",
    "num-server-rounds",
    "round-timeout",
    "run-name",
    "results-dir",
    "tracking",
)


@dataclass(frozen=True)
class OutputSection:
    """Run-config keys ``results-dir``, ``run-name``, ``resume``, ``tracking``.

    The run's folder is ``<results_dir>/<run_name>`` (a name from the strategy and the
    time when empty); ``resume``, a run folder, goes on from its last checkpoint
    instead. ``tracking`` names the experiment trackers each round is logged to, comma
    separated (``"tensorboard"``, ``"mlflow"``, ``"tensorboard,mlflow"``; empty: none).
    """

    results_dir: str = "results"
    run_name: str = ""
    resume: str = ""
    tracking: str = ""

    def __post_init__(self) -> None:
        unknown = [name for name in self.trackers() if name not in TRACKERS]
        check_fields(self, [("tracking", not unknown, one_of(TRACKERS))])

    def trackers(self) -> list[str]:
        """The tracker names ``tracking`` lists, in order, without repeats."""
        names = [name.strip() for name in self.tracking.split(",") if name.strip()]
        return list(dict.fromkeys(names))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> OutputSection:
        """The section from an app's run-config: its own keys, the rest ignored."""
        values = {}
        for field in fields(cls):
            key = field.name.replace("_", "-")
            if key in run_config:
                value = run_config[key]
                if not isinstance(value, str):
                    raise ConfigError(f"{key}={value!r}: set a string (in quotes)")
                values[field.name] = value
        try:
            return cls(**values)
        except SettingError as err:  # name the run-config key, as fl-ec's own config does
            raise ConfigError(f"{err.field.replace('_', '-')}={err.value!r} {err.reason}") from None


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """``ConfigError`` naming each run-config key whose value differs from the saved run's.

    A resumed run must be the run it continues: only the keys in
    :data:`RESUME_MAY_CHANGE` (more rounds, a longer timeout, other trackers) may change.
    Keys only one side has (added or retired since) are left out of the comparison.
    """
    changed = [
        f"{key} ({saved[key]!r} -> {current[key]!r})"
        for key in sorted(set(saved) & set(current))
        if key not in RESUME_MAY_CHANGE and saved[key] != current[key]
    ]
    if changed:
        raise ConfigError(
            "resume: the run-config differs from the checkpointed run's in "
            f"{', '.join(changed)}; set them back (only {', '.join(RESUME_MAY_CHANGE[1:])} "
            "may change)"
        )
