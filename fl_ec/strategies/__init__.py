"""Flower strategies (thin glue over fl_ec's algorithms) and their helpers."""

from fl_ec.strategies.factory import build_strategy
from fl_ec.strategies.fedec import FedEC
from fl_ec.strategies.instrumentation import MeteredGrid, payload_bytes, time_aggregation

__all__ = ["FedEC", "MeteredGrid", "build_strategy", "payload_bytes", "time_aggregation"]
