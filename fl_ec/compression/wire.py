"""Quantized weights on the wire: int8, or 4 / 2-bit values packed into bytes.

A packed state travels as a plain ``dict[str, np.ndarray]`` (an ``ArrayRecord``) plus
a small JSON manifest ``{key: {"bits": b, "shape": [...]}}`` -- no pickles. For each
quantized weight the arrays hold ``key`` (int8, or uint8 with 2 or 4 values per byte)
and ``key + SCALE_SUFFIX`` (fp32 per-channel scales). Everything else (biases,
BatchNorm) stays fp32. Unpacking returns exactly ``q * scale``, the values the
fake-quantized model computes with.
"""

from __future__ import annotations

import math
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


def unpack_state_dict(arrays: Mapping[str, np.ndarray], manifest: Any) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state_dict`; raises ``ValueError`` on malformed input.

    The manifest and every packed entry are checked before anything is unpacked: a
    mapping of entries with ``bits`` in 2 / 4 / 8 and a non-empty shape of positive
    sizes, a 1-D scale per output channel, and exactly the bytes the shape needs.
    """
    if not isinstance(manifest, Mapping):
        raise ValueError("the manifest must map keys to {bits, shape}")
    state: dict[str, torch.Tensor] = {}
    for key, array in arrays.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if key not in manifest:
            state[key] = torch.from_numpy(np.array(array, copy=True))
            continue
        bits, shape = _entry(key, manifest[key])
        count = math.prod(shape)
        scale = np.asarray(arrays.get(key + SCALE_SUFFIX, np.zeros(0)))
        packed = np.asarray(array)
        if scale.shape != (shape[0],) or scale.dtype.kind != "f":
            raise ValueError(f"packed entry {key!r} needs {shape[0]} float scales")
        wanted = count if bits == 8 else -(-count * bits // 8)
        if packed.ndim != 1 or packed.size != wanted or packed.dtype.itemsize != 1:
            raise ValueError(f"packed entry {key!r} does not match its shape {list(shape)}")
        if bits == 8:
            values = packed.view(np.int8).astype(np.int16)
        else:
            values = _unpack_signed(packed, bits, count)
        q = torch.from_numpy(values.reshape(shape).astype(np.int8))
        state[key] = dequantize(q, torch.from_numpy(scale.astype(np.float32)))
    missing = [k for k in manifest if k not in state]
    if missing:
        raise ValueError(f"packed state lacks {missing[:3]}")
    return state


def _entry(key: str, entry: Any) -> tuple[int, tuple[int, ...]]:
    """A manifest entry's bits and shape, checked."""
    try:
        bits = entry["bits"]
        shape = tuple(entry["shape"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"packed entry {key!r} is malformed: {err}") from None
    if bits not in (2, 4, 8) or isinstance(bits, bool):
        raise ValueError(f"packed entry {key!r} has unsupported bits={bits!r}")
    if not shape or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise ValueError(f"packed entry {key!r} has a malformed shape {list(shape)}")
    return bits, shape


def packed_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of a packed (or plain) state: what the tensors themselves weigh."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
