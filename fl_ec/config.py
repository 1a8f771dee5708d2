"""Run-config -> one typed, validated config object, made of the sections their code owns.

This is the only module that reads Flower's ``context.run_config``: a flat mapping of
kebab-case keys, defaults in ``[tool.flwr.app.config]`` of ``pyproject.toml``.
:class:`ExperimentConfig` splits it into small frozen sections, each defined next to
the code that uses it and checked by that code when the section is built:

=================  ===========================================  ==========================
section            keys                                         defined in
=================  ===========================================  ==========================
``federation``     strategy ... min-train-replies               fl_ec.strategies.sections
``data``           dataset ... validation-size                  fl_ec.data.settings
``seed``           seed (shared by every section)               here
``training``       model ... client-threads, trainer            fl_ec.clients.settings
``fedec``          teacher-rule ... distill-trainer             fl_ec.strategies.sections
``fedhce``         variants ... calibrate-variants              fl_ec.strategies.sections
``simulation``     simulated-tiers, attack, fail-*              fl_ec.clients.settings
``layer_parallel`` lp-*                                         fl_ec.layer_parallel.section
``output``         results-dir ... tracking                     fl_ec.run.settings
=================  ===========================================  ==========================

A section's field ``foo_bar`` is the run-config key ``foo-bar``. A bad value fails in
the first second of a run with one line naming the key and what to change, instead of
deep inside a client after Flower's start-up: a section's
:class:`~fl_ec.errors.SettingError` becomes a :class:`~fl_ec.errors.ConfigError` naming
the key. This module checks only what spans sections.

The sections' defaults are the only ones: Flower reads every key's default from
``pyproject.toml``, whose table ``python -m fl_ec.config --pyproject`` writes from them
(:func:`with_app_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_ec.clients.settings import NodeSettings, SimulationSection, TrainingSection
from fl_ec.data.settings import DataSection
from fl_ec.errors import ConfigError, SettingError
from fl_ec.layer_parallel.objectives import LPSettings
from fl_ec.layer_parallel.section import LayerParallelSection
from fl_ec.retired_keys import RETIRED_KEYS, retired_message
from fl_ec.run.settings import RESUME_MAY_CHANGE, OutputSection, check_resumable
from fl_ec.strategies.sections import FedECSection, FederationSection, FedHCESection

__all__ = [
    "APP_CONFIG_TABLE",
    "REGENERATE_COMMAND",
    "RESUME_MAY_CHANGE",
    "RETIRED_KEYS",
    "ConfigError",
    "ExperimentConfig",
    "NodeSettings",
    "OutputSection",
    "app_config_lines",
    "check_resumable",
    "main",
    "run_config_key",
    "with_app_config",
]


@dataclass(frozen=True)
class ExperimentConfig:
    """Every knob of an fl-ec experiment, section by section (docs/configuration.md).

    ``ExperimentConfig()`` is the default experiment; ``extra`` holds run-config keys
    that are not fl-ec's (an app's own).
    """

    federation: FederationSection = field(default_factory=FederationSection)
    data: DataSection = field(default_factory=DataSection)
    # Seeds the hold-out, the partitions, the initial model, the client shuffles, the
    # sampling of clients, FedEC's proxy subsets and the simulated failures.
    seed: int = 42
    training: TrainingSection = field(default_factory=TrainingSection)
    fedec: FedECSection = field(default_factory=FedECSection)
    fedhce: FedHCESection = field(default_factory=FedHCESection)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    layer_parallel: LayerParallelSection = field(default_factory=LayerParallelSection)
    output: OutputSection = field(default_factory=OutputSection)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """The rules that span sections; each section checked its own values."""
        calibration = self.fedec.calibration_settings()
        if calibration.method != "none" and self.federation.strategy == "fedavg":
            raise ConfigError(
                f"calibration={self.fedec.calibration!r} is a FedEC step (it needs the "
                "server's proxy set or a query to the clients): for FedAvg + calibration set "
                'strategy="fedec", distill-steps=0, client-start="average"'
            )
        if self.uses_layer_parallel and not self.training.model.startswith("resnet"):
            raise ConfigError(
                f"layer-parallel training splits a ResNet at block boundaries: set "
                f'model="resnet20" (or another resnet<6n+2>), not {self.training.model!r}'
            )

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, Any], *, allow_retired: bool = False
    ) -> ExperimentConfig:
        """Parse and validate a Flower run-config mapping; missing keys take their defaults.

        Each value is converted to its field's type, then each section is built (and
        checks itself); the first bad value raises :class:`ConfigError` naming its key.
        Unknown keys are kept in :attr:`extra` rather than rejected, so an app can carry
        keys of its own. A key fl-ec used to have (:data:`RETIRED_KEYS`) fails with what
        to use instead, since silently ignoring it would run something else than asked;
        ``allow_retired`` lets tools re-read the configs recorded by older runs.
        """
        values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        top: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, raw in run_config.items():
            if key in RETIRED_KEYS and not allow_retired:
                raise ConfigError(retired_message(key))
            if key not in _PLACES:
                extra[key] = raw
                continue
            section, place = _PLACES[key]
            value = _coerce(key, raw, place.type)
            (values[section] if section else top)[place.name] = value
        sections = {name: _build_section(kind, values[name]) for name, kind in _SECTIONS.items()}
        return cls(**sections, **top, extra=extra)

    @property
    def uses_layer_parallel(self) -> bool:
        """Whether the clients or the server's distillation train layer-parallel."""
        return "layer-parallel" in (self.training.trainer, self.fedec.distill_trainer)

    def lp_settings(self, **overrides: Any) -> LPSettings:
        """The layer-parallel trainer's settings, with ``overrides`` (LPSettings fields).

        The ``lp-*`` knobs, the clients' batch size, lr, momentum and seed, and no weight
        decay (as the clients' SGD). A bad override raises :class:`ConfigError` naming the
        LPSettings field (no run-config key set it).
        """
        training = self.training
        fields = {
            "batch_size": training.batch_size,
            "lr": training.lr,
            "momentum": training.momentum,
            "seed": self.seed,
            "weight_decay": 0.0,
            **overrides,
        }
        try:
            return self.layer_parallel.settings(**fields)
        except SettingError as err:
            raise ConfigError(str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        """The flat kebab-case run-config, as written to ``metrics.json`` and checkpoints."""
        out: dict[str, Any] = {}
        for top in dataclasses.fields(self):
            if top.name == "extra":
                continue
            value = getattr(self, top.name)
            if top.name in _SECTIONS:
                fields = dataclasses.fields(value)
                out.update({run_config_key(f.name): getattr(value, f.name) for f in fields})
            else:
                out[run_config_key(top.name)] = value
        out.update(self.extra)
        return out


def run_config_key(field_name: str) -> str:
    """The run-config key of a section's field: ``foo_bar`` -> ``foo-bar``."""
    return field_name.replace("_", "-")


def _section_types() -> dict[str, type]:
    """ExperimentConfig's section fields -> their section classes, in order."""
    return {
        top.name: top.default_factory  # type: ignore[misc]
        for top in dataclasses.fields(ExperimentConfig)
        if dataclasses.is_dataclass(top.default_factory)
    }


def _key_places() -> dict[str, tuple[str, dataclasses.Field]]:
    """Each run-config key -> (its section, "" for a top-level field; the field)."""
    places: dict[str, tuple[str, dataclasses.Field]] = {}
    for top in dataclasses.fields(ExperimentConfig):
        if top.name == "extra":
            continue
        section = _SECTIONS.get(top.name)
        owned = [(top.name, f) for f in dataclasses.fields(section)] if section else [("", top)]
        for name, place in owned:
            key = run_config_key(place.name)
            if key in places:  # two sections must never claim one key
                raise RuntimeError(f"run-config key {key} is a field of two sections")
            places[key] = (name, place)
    return places


_SECTIONS = _section_types()
_PLACES = _key_places()


def _build_section(kind: type, values: dict[str, Any]) -> Any:
    """``kind(**values)``; a :class:`SettingError` becomes a ConfigError naming the key.

    A section reports a bad value of its own field, or of a field of the settings
    object it builds; ``OWNER_FIELDS`` maps such a field to the section's. An error in
    a field no run-config key sets keeps the settings' own message.
    """
    try:
        return kind(**values)
    except SettingError as err:
        name = getattr(kind, "OWNER_FIELDS", {}).get(err.field, err.field)
        if name not in {f.name for f in dataclasses.fields(kind)}:
            raise ConfigError(str(err)) from None
        raise ConfigError(f"{run_config_key(name)}={err.value!r} {err.reason}") from None


def _coerce(key: str, raw: Any, annotation: Any) -> Any:
    """Convert a run-config value to the field's declared type, or fail readably."""
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
                return raw.lower() in ("true", "1")
            if isinstance(raw, int | float) and raw in (0, 1):
                return bool(raw)
            raise ValueError
        if kind == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if kind == "str":
            return str(raw)
    except (TypeError, ValueError):
        pass
    else:
        return raw
    raise ConfigError(f"run-config {key}={raw!r} is not a valid {kind}")


# pyproject.toml's table of defaults, which Flower reads: generated from the sections.
APP_CONFIG_TABLE = "[tool.flwr.app.config]"
APP_CONFIG_HEADER = (
    "# Every knob of the experiment; docs/configuration.md explains each. Override with",
    '#   flwr run . --run-config "num-server-rounds=3 alpha=0.1"',
)
REGENERATE_COMMAND = "python -m fl_ec.config --pyproject"


def app_config_lines(order: Sequence[str] = ()) -> list[str]:
    """``[tool.flwr.app.config]`` with every key's default, under its comment header.

    Keys keep their place in ``order`` (the table as it stands, so that regenerating
    it moves nothing); a key not in ``order`` follows the key before it in
    :meth:`ExperimentConfig.to_dict`.
    """
    defaults = ExperimentConfig().to_dict()
    keys = [key for key in order if key in defaults]
    for index, key in enumerate(defaults):
        if key not in keys:
            keys.insert(keys.index(list(defaults)[index - 1]) + 1 if index else 0, key)
    return [
        *APP_CONFIG_HEADER,
        APP_CONFIG_TABLE,
        *(f"{key} = {_toml(defaults[key])}" for key in keys),
    ]


def with_app_config(pyproject_text: str) -> str:
    """``pyproject_text`` with its ``[tool.flwr.app.config]`` (and the comment above it)
    regenerated by :func:`app_config_lines`; appended when it has none."""
    lines = pyproject_text.splitlines()
    if APP_CONFIG_TABLE not in lines:
        return "\n".join([*lines, "", *app_config_lines()]) + "\n"
    start = end = lines.index(APP_CONFIG_TABLE)
    while end + 1 < len(lines) and lines[end + 1].strip() and not lines[end + 1].startswith("["):
        end += 1
    table = lines[start + 1 : end + 1]
    order = [line.partition("=")[0].strip() for line in table if not line.startswith("#")]
    while start > 0 and lines[start - 1].startswith("#"):
        start -= 1
    lines[start : end + 1] = app_config_lines(order)
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    """A default as a TOML literal: true/false, a number, or a double-quoted string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def main(argv: list[str] | None = None) -> int:
    """``python -m fl_ec.config``: print the table of defaults, or rewrite it in place."""
    parser = argparse.ArgumentParser(
        prog="python -m fl_ec.config",
        description="Print the run-config's defaults as pyproject.toml's "
        f"{APP_CONFIG_TABLE} table, or regenerate that table in a pyproject.toml.",
    )
    parser.add_argument(
        "--pyproject",
        nargs="?",
        const="pyproject.toml",
        type=Path,
        metavar="PATH",
        help="regenerate the table in PATH (default: ./pyproject.toml)",
    )
    args = parser.parse_args(argv)
    if args.pyproject is None:
        print("\n".join(app_config_lines()))
        return 0
    text = args.pyproject.read_text()
    updated = with_app_config(text)
    args.pyproject.write_text(updated)
    state = "unchanged" if updated == text else "regenerated"
    print(f"{args.pyproject}: {APP_CONFIG_TABLE} {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
