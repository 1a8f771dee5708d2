"""Unsigned integer codes of 1 to 8 bits, packed densely into bytes, and back.

The layout is a little-endian bit stream: code ``i`` occupies stream bits
``[i * bits, (i + 1) * bits)``, and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``.
So at 4 bits byte ``j`` holds code ``2j`` in its low nibble and code ``2j + 1`` in its
high nibble; at 2 bits it holds codes ``4j .. 4j + 3`` from the low bits up; at 6 bits
four codes fill three bytes, a code may straddle two. The stream is zero-padded to a
whole byte: ``ceil(count * bits / 8)`` bytes (:func:`packed_size`).

Two users share it: the quantized weights on the wire (:mod:`fl_ec.compression.wire`,
2 and 4 bits, read back by clients) and the coded activations that cross a
layer-parallel stage boundary (:mod:`fl_ec.layer_parallel.objectives`, 8 / 6 / 4 bits,
packed every step, so the code stays vectorised and runs on the tensor's device).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F  # noqa: N812 - the universal alias

# Eight codes of at most 8 bits fill a whole number of bytes (``bits`` of them) and fit
# one int64 word: packing goes through such words, one per group of eight codes.
_GROUP = 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bit-packing takes 1 to 8 bits per code, not {bits}")


def packed_size(count: int, bits: int) -> int:
    """Bytes that :func:`pack_codes` makes of ``count`` codes of ``bits`` bits."""
    _check_bits(bits)
    return -(-count * bits // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes (any shape and integer dtype) -> a flat uint8 tensor.

    Every code must lie in ``[0, 2**bits)``; values outside would spill into their
    neighbours' bits. The result has :func:`packed_size` bytes in the module's layout.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.to(torch.uint8)
    count = flat.numel()
    flat = flat.to(torch.int64)
    if count % _GROUP:
        flat = F.pad(flat, (0, _GROUP - count % _GROUP))
    shifts = torch.arange(_GROUP, device=flat.device) * bits
    words = (flat.view(-1, _GROUP) << shifts).sum(1)  # the fields do not overlap: sum == OR
    byte_shifts = torch.arange(bits, device=flat.device) * 8
    packed = ((words[:, None] >> byte_shifts) & 255).to(torch.uint8).reshape(-1)
    # A padded group's trailing bytes hold only padding; the layout ends at the last code.
    return packed[: packed_size(count, bits)]


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` codes, as a flat int64 tensor.

    Bytes past the ``count``-th code are ignored; raises ``ValueError`` when ``packed``
    is too short to hold ``count`` codes.
    """
    needed = packed_size(count, bits)
    flat = packed.reshape(-1)
    if flat.numel() < needed:
        raise ValueError(f"{flat.numel()} bytes cannot hold {count} codes of {bits} bits")
    flat = flat[:needed].to(torch.int64)
    if bits == 8:
        return flat
    if needed % bits:  # back to whole groups of eight codes (``bits`` bytes each)
        flat = F.pad(flat, (0, bits - needed % bits))
    byte_shifts = torch.arange(bits, device=flat.device) * 8
    words = (flat.view(-1, bits) << byte_shifts).sum(1)
    shifts = torch.arange(_GROUP, device=flat.device) * bits
    return ((words[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]
