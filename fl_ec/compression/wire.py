"""Quantized weights on the wire: int8, or 4 / 2-bit values packed into bytes.

A packed state travels as a plain ``dict[str, np.ndarray]`` (an ``ArrayRecord``) plus
a small JSON manifest ``{key: {"bits": b, "shape": [...]}}`` -- no pickles. For each
quantized weight the arrays hold ``key`` (int8, or uint8 with 2 or 4 values per byte)
and ``key + SCALE_SUFFIX`` (fp32 per-channel scales). Everything else (biases,
BatchNorm) stays fp32. Unpacking returns exactly ``q * scale``, the values the
fake-quantized model computes with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from fl_ec.bitpack import pack_codes, unpack_codes
from fl_ec.compression.quantization import dequantize, quantize_per_channel

SCALE_SUFFIX = "::scale"


def _pack_signed(q: torch.Tensor, bits: int) -> np.ndarray:
    """Signed ints in [-(2^(b-1)-1), 2^(b-1)-1] -> uint8, 8/bits values per byte.

    Each value is offset by ``2^(b-1)`` to an unsigned code, then bit-packed
    (:func:`fl_ec.bitpack.pack_codes`: value ``i`` in the bits ``[i*b, (i+1)*b)``
    of the little-endian byte stream).
    """
    return pack_codes(q.reshape(-1).to(torch.int64) + 2 ** (bits - 1), bits).numpy()


def _unpack_signed(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`_pack_signed`: ``count`` signed values (raises ``ValueError``)."""
    codes = unpack_codes(torch.from_numpy(np.array(packed, np.uint8).reshape(-1)), bits, count)
    return codes.numpy() - 2 ** (bits - 1)


def pack_state_dict(
    state: Mapping[str, torch.Tensor],
    bits: int,
    quantized_keys: Iterable[str],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Quantize ``quantized_keys`` of ``state`` to ``bits`` and pack them for sending."""
    chosen = set(quantized_keys) if bits else set()
    arrays: dict[str, np.ndarray] = {}
    manifest: dict[str, Any] = {}
    for key, value in state.items():
        if key not in chosen:
            arrays[key] = value.detach().cpu().numpy()
            continue
        q, scale = quantize_per_channel(value, bits)
        arrays[key] = q.numpy().reshape(-1) if bits == 8 else _pack_signed(q, bits)
        arrays[key + SCALE_SUFFIX] = scale.numpy().astype(np.float32)
        manifest[key] = {"bits": bits, "shape": list(value.shape)}
    return arrays, manifest


def unpack_state_dict(
    arrays: Mapping[str, np.ndarray], manifest: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state_dict`; raises ``ValueError`` on malformed input."""
    state: dict[str, torch.Tensor] = {}
    for key, array in arrays.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if key not in manifest:
            state[key] = torch.from_numpy(np.array(array, copy=True))
            continue
        try:
            bits = int(manifest[key]["bits"])
            shape = tuple(int(s) for s in manifest[key]["shape"])
            scale = torch.from_numpy(np.asarray(arrays[key + SCALE_SUFFIX], np.float32).copy())
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"packed entry {key!r} is malformed: {err}") from None
        count = int(np.prod(shape))
        if bits == 8:
            values = np.asarray(array, np.int8).astype(np.int16)
        elif bits in (2, 4):
            try:
                values = _unpack_signed(array, bits, count)
            except ValueError:  # too few bytes for the shape
                raise ValueError(
                    f"packed entry {key!r} does not match its shape {list(shape)}"
                ) from None
        else:
            raise ValueError(f"packed entry {key!r} has unsupported bits={bits}")
        if values.size != count or scale.numel() != shape[0]:
            raise ValueError(f"packed entry {key!r} does not match its shape {list(shape)}")
        q = torch.from_numpy(values.reshape(shape).astype(np.int8))
        state[key] = dequantize(q, scale)
    missing = [k for k in manifest if k not in state]
    if missing:
        raise ValueError(f"packed state lacks {missing[:3]}")
    return state


def packed_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of a packed (or plain) state: what the tensors themselves weigh."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
