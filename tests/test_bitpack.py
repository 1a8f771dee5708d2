"""The one bit-packer: its byte layout pinned, for the wire's weights and the boundary codes."""

import numpy as np
import pytest
import torch

from fl_ec.bitpack import pack_codes, packed_size, unpack_codes
from fl_ec.compression import pack_state_dict, unpack_state_dict

# Eleven codes: a ragged tail at every width, every bit of a field set (2^b - 1), none (0).
CODES = [1, 2, 3, -1, 0, 5, 6, 7, -2, 9, 10]  # -1 / -2 stand for 2^b - 1 / 2^b - 2


def _codes(bits: int) -> torch.Tensor:
    return torch.tensor([c % 2**bits for c in CODES])


def _reference(codes: torch.Tensor, bits: int) -> bytes:
    """The layout by definition: code i at bits [i*b, (i+1)*b) of a little-endian stream."""
    stream = sum(int(code) << (i * bits) for i, code in enumerate(codes))
    return stream.to_bytes(-(-len(codes) * bits // 8), "little")


# The boundary codes' widths, and the wire's. Pinned bytes: a change here changes what
# peers running an older version read.
PINNED = {
    8: "01 02 03 ff 00 05 06 07 fe 09 0a",
    6: "81 30 fc 40 61 1c 7e a2 00",
    4: "21 f3 50 76 9e 0a",
    2: "f9 e4 26",
}


@pytest.mark.parametrize("bits", sorted(PINNED))
def test_codes_pack_to_the_pinned_bytes(bits):
    codes = _codes(bits)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert bytes(packed.tolist()) == bytes.fromhex(PINNED[bits]) == _reference(codes, bits)
    assert packed.numel() == packed_size(len(codes), bits)
    assert torch.equal(unpack_codes(packed, bits, len(codes)), codes)


@pytest.mark.parametrize("bits", [8, 6, 4, 2, 1, 3])
def test_round_trip_for_every_length_and_shape(bits):
    generator = torch.Generator().manual_seed(bits)
    for count in range(1, 34):
        codes = torch.randint(0, 2**bits, (count,), generator=generator)
        packed = pack_codes(codes, bits)
        assert bytes(packed.tolist()) == _reference(codes, bits)
        assert torch.equal(unpack_codes(packed, bits, count), codes)
    grid = torch.randint(0, 2**bits, (3, 4, 5), generator=generator).float()  # float codes
    assert torch.equal(unpack_codes(pack_codes(grid, bits), bits, 60).view(3, 4, 5), grid.long())


def test_unpack_ignores_extra_bytes_and_rejects_too_few():
    packed = pack_codes(_codes(4), 4)
    longer = torch.cat([packed, torch.full((3,), 255, dtype=torch.uint8)])
    assert torch.equal(unpack_codes(longer, 4, len(CODES)), _codes(4))
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_codes(packed[:-1], 4, len(CODES))
    with pytest.raises(ValueError, match="1 to 8 bits"):
        pack_codes(_codes(4), 9)


# A weight whose per-channel quantization is exact to read off: row 0 has max |w| = 7,
# row 1 max |w| = 3.5, so at 4 bits (qmax 7) the scales are 1 and 0.5.
WEIGHT = torch.tensor([[-7.0, 7, 0, 1, -1], [3.5, -3.5, 0, 1, 2]])
WIRE_PINNED = {
    # q = [-7 7 0 1 -1 | 7 -7 0 2 4] + 8, two per byte, low nibble first
    4: ("f1 98 f7 81 ca", [1.0, 0.5]),
    # q = [-1 1 0 0 0 | 1 -1 0 0 1] + 2, four per byte, low bits first
    2: ("ad 9e 0e", [7.0, 3.5]),
}


@pytest.mark.parametrize("bits", sorted(WIRE_PINNED))
def test_quantized_weights_pack_to_the_pinned_wire_bytes(bits):
    """The wire format clients read: signed values offset by 2^(b-1), then bit-packed."""
    arrays, manifest = pack_state_dict({"w": WEIGHT}, bits, ["w"])
    hex_bytes, scales = WIRE_PINNED[bits]
    assert arrays["w"].dtype == np.uint8
    assert arrays["w"].tobytes() == bytes.fromhex(hex_bytes)
    assert arrays["w::scale"].tolist() == scales
    assert manifest == {"w": {"bits": bits, "shape": [2, 5]}}
    # Reading back bytes as they arrive (a read-only buffer) gives q * scale.
    received = {k: np.frombuffer(v.tobytes(), v.dtype) for k, v in arrays.items()}
    restored = unpack_state_dict(received, manifest)["w"]
    if bits == 4:
        assert torch.equal(restored, WEIGHT)
    else:
        assert torch.equal(restored, torch.tensor([[-7.0, 7, 0, 0, 0], [3.5, -3.5, 0, 0, 3.5]]))
