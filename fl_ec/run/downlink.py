"""Send a strategy's training model quantized: int8 (or 4 / 2-bit) weights down the wire.

:class:`QuantizedDownlink` wraps any strategy whose training messages carry the global
model as fp32 arrays (Flower's ``FedAvg``): the conv/linear weights of every training
message are sent as per-channel quantized integers plus their scales, with the JSON
manifest that fl-ec's ClientApp and :func:`fl_ec.clients.receive_variant` unpack. The
clients train the dequantized weights in fp32 and reply in fp32; what the inner
strategy aggregates is unchanged. This is how a practitioner meets a download limit
with a plain FedAvg model: the rounding is paid once per round, on the way down.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_ec.compression import pack_state_dict
from fl_ec.compression.quantization import SUPPORTED_BITS
from fl_ec.protocol import ARRAY_RECORD_KEY, CONFIG_RECORD_KEY, WIRE_MANIFEST_KEY
from fl_ec.run.wrapper import StrategyWrapper


class QuantizedDownlink(StrategyWrapper):
    """``strategy`` with the weights of its training messages sent as ``bits``-bit ints.

    Quantized are the floating-point arrays of two or more dimensions (conv and linear
    weights); biases and norm statistics stay fp32.
    """

    def __init__(self, strategy: Strategy, bits: int) -> None:
        super().__init__(strategy)
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits} must be one of {SUPPORTED_BITS}")
        self.bits = bits

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's training messages, their weights packed once per round."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        packed: dict[int, tuple[ArrayRecord, str]] = {}  # one packing per distinct record
        done: set[int] = set()  # FedAvg's messages may share one content
        for message in messages:
            content = message.content
            if id(content) in done or ARRAY_RECORD_KEY not in content.array_records:
                continue
            done.add(id(content))
            record = content.array_records[ARRAY_RECORD_KEY]
            if id(record) not in packed:
                packed[id(record)] = self._pack(record)
            wire, manifest = packed[id(record)]
            round_config = content.config_records.get(CONFIG_RECORD_KEY, ConfigRecord())
            content[ARRAY_RECORD_KEY] = wire
            content[CONFIG_RECORD_KEY] = ConfigRecord(
                {**dict(round_config), WIRE_MANIFEST_KEY: manifest}
            )
        return messages

    def _pack(self, record: ArrayRecord) -> tuple[ArrayRecord, str]:
        state = record.to_torch_state_dict()
        weights = [k for k, v in state.items() if v.is_floating_point() and v.dim() >= 2]
        arrays, manifest = pack_state_dict(state, self.bits, weights)
        wire = ArrayRecord({k: Array(np.ascontiguousarray(a)) for k, a in arrays.items()})
        return wire, json.dumps(manifest, sort_keys=True)

    def describe(self) -> str:
        """The downlink's precision."""
        return f"training weights sent as int{self.bits}"
