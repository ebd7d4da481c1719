"""Bit packing: exact round trips, the documented word layout, and clear errors for shapes that do not fit."""
from __future__ import annotations

import pytest
import torch

from slimlm.core.packing import pack_int32, unpack_int32, words_needed


def _codes(shape, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)


def _stream_words(values: list[int], bits: int) -> list[int]:
    """Independent reference: one Python integer as the little-endian bit stream, cut into 32-bit words."""
    stream = sum(v << (bits * i) for i, v in enumerate(values))
    n_words = words_needed(len(values), bits)
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(3, 64), (1, 96), (5, 2, 32)])
def test_round_trip_last_dim(bits, shape):
    n = shape[-1]
    if (n * bits) % 32:
        pytest.skip("length does not fill whole words at this width")
    c = _codes(shape, bits)
    p = pack_int32(c, bits)
    assert p.dtype == torch.int32 and p.shape == (*shape[:-1], n * bits // 32)
    assert torch.equal(unpack_int32(p, bits), c)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_dim0_matches_transpose(bits):
    c = _codes((96, 5), bits, seed=1)          # GPTQ qweight: (in, out) packed along in
    p0 = pack_int32(c, bits, dim=0)
    assert p0.shape == (96 * bits // 32, 5)
    assert torch.equal(p0, pack_int32(c.T, bits).T)
    assert torch.equal(unpack_int32(p0, bits, 96, dim=0), c)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 33, 45, 100])
def test_round_trip_padded_odd_lengths(bits, n):
    c = _codes((4, n), bits, seed=n)
    p = pack_int32(c, bits, pad=True)
    assert p.shape == (4, words_needed(n, bits))
    assert torch.equal(unpack_int32(p, bits, n), c)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_is_little_endian_bit_stream(bits):
    c = _codes((1, 64), bits, seed=7)
    want = torch.tensor([_stream_words(c[0].tolist(), bits)], dtype=torch.int32)
    assert torch.equal(pack_int32(c, bits), want)


def test_known_words():
    assert pack_int32(torch.arange(1, 9, dtype=torch.uint8)[None], 4).item() & 0xFFFFFFFF == 0x87654321
    assert pack_int32(torch.tensor([[1, 2, 3, 4]]), 8).item() & 0xFFFFFFFF == 0x04030201
    assert pack_int32(torch.tensor([[3] + [0] * 15]), 2).item() == 3
    # 3-bit: code 10 straddles words 0 and 1 (bits 30..32), code 21 words 1 and 2 (bits 63..65)
    c = torch.zeros(1, 32, dtype=torch.uint8)
    c[0, 10] = 0b111
    c[0, 21] = 0b111
    w = [x & 0xFFFFFFFF for x in pack_int32(c, 3)[0].tolist()]
    assert w == [0b11 << 30, 1 | (1 << 31), 0b11]


def test_errors_say_what_fits():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int32(torch.zeros(2, 12, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_int32(torch.zeros(40, 2, dtype=torch.uint8), 3, dim=0)
    with pytest.raises(ValueError, match="out of range"):
        pack_int32(torch.full((1, 8), 16, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="integer codes"):
        pack_int32(torch.zeros(1, 8), 4)
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack_int32(torch.zeros(1, 3, dtype=torch.int32), 4, 30)
    with pytest.raises(ValueError, match="int32"):
        unpack_int32(torch.zeros(1, 3, dtype=torch.int64), 4)


def test_matches_compressed_tensors_packer():
    from compressed_tensors.compressors.pack_quantized import helpers  # a dev dependency: fails, not skips
    for bits in (2, 3, 4, 8):
        for n in (64, 40):
            c = _codes((3, n), bits, seed=bits + n)
            signed = (c.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
            assert torch.equal(pack_int32(c, bits, pad=True), helpers.pack_to_int32(signed, bits))
            assert torch.equal(pack_int32(c.T, bits, dim=0, pad=True),
                               helpers.pack_to_int32(signed.T.contiguous(), bits, packed_dim=0))
