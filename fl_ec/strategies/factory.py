"""Run-config strategy name -> a configured Flower strategy instance."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, Strategy

from fl_ec.config import STRATEGIES, ExperimentConfig
from fl_ec.errors import ConfigError


def build_strategy(config: ExperimentConfig) -> Strategy:
    """The strategy named by ``config.strategy``, with the federation knobs applied.

    ``fedavg`` is Flower's own ``FedAvg``, unchanged: the baseline every fl-ec
    strategy is compared against.
    """
    common = dict(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_train_nodes,
        min_evaluate_nodes=config.min_evaluate_nodes,
        min_available_nodes=config.min_available_nodes,
    )
    if config.strategy == "fedavg":
        return FedAvg(**common)
    raise ConfigError(
        f"strategy={config.strategy!r} is unknown: choose one of {', '.join(STRATEGIES)}"
    )
