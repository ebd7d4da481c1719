"""NF4 / FP4 block-wise quantization with double quant: invariants, SQNR, and bit-exactness vs bitsandbytes."""
import pytest
import torch

from slimlm.core import nf4
from slimlm.errors import ConfigError

SHAPES = [(64, 64), (33, 17), (3, 5, 7), (1000,), (128, 300)]  # includes numel % 64 != 0 and odd numel


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.float(), approx.float()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum())).item()


def weight(shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # heavy-ish tails so blocks differ in scale and the absmax spread is non-trivial
    return (torch.randn(shape, generator=g) * (0.2 + torch.rand(shape, generator=g) ** 3) * 0.05).to(dtype)


def test_code_tables():
    t = nf4.code_table("nf4")
    assert t.shape == (16,) and torch.all(t[1:] > t[:-1])
    assert t[0] == -1 and t[7] == 0 and t[15] == 1
    f = nf4.code_table("fp4")
    assert torch.equal(f[8:], -f[:8]) and f.abs().max() == 1 and f[0] == 0  # bit 3 is the sign
    d = nf4.dynamic_map_8bit()
    assert d.shape == (256,) and torch.all(d[1:] > d[:-1]) and d[-1] == 1 and (d == 0).sum() == 1
    with pytest.raises(ConfigError):
        nf4.code_table("int4")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_codes_are_nearest_and_pack_round_trip(quant_type, shape):
    W = weight(shape, seed=1)
    q = nf4.quantize_4bit(W, quant_type, blocksize=64, double_quant=False)
    n = W.numel()
    assert q.packed.dtype == torch.uint8 and q.packed.shape == ((n + 1) // 2,)
    assert q.absmax.shape == (-(-n // 64),)
    codes = nf4.unpack_codes(q).long()
    table = nf4.code_table(quant_type)
    c = q.absmax[torch.arange(n) // 64]
    x = W.reshape(-1) / c
    err = (x - table[codes]).abs()
    best = (x[:, None] - table[None, :]).abs().min(dim=1).values
    assert torch.all(err <= best + 1e-6)  # nearest table value
    # the packed bytes are exactly (code[2i] << 4) | code[2i+1], padded with the code of 0.0
    zero_code = int(torch.nonzero(table == 0)[0])
    padded = torch.cat([codes, torch.full((n % 2,), zero_code)])
    assert torch.equal(q.packed.long(), padded[0::2] * 16 + padded[1::2])
    W_hat = nf4.dequantize_4bit(q)
    assert W_hat.shape == W.shape and torch.equal(W_hat.reshape(-1), table[codes] * c)


@pytest.mark.parametrize("quant_type,min_db", [("nf4", 20.0), ("fp4", 17.5)])
def test_sqnr_gaussian(quant_type, min_db):
    W = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    plain = sqnr_db(W, nf4.dequantize_4bit(nf4.quantize_4bit(W, quant_type, double_quant=False)))
    dq = sqnr_db(W, nf4.dequantize_4bit(nf4.quantize_4bit(W, quant_type, double_quant=True)))
    assert plain > min_db
    assert plain - 0.05 < dq <= plain + 0.01  # 8-bit absmax costs almost nothing


def test_double_quant_absmax_error_bound():
    W = weight((256, 512), seed=2)
    c = nf4.quantize_4bit(W, double_quant=False).absmax
    for bins in (65536, 0):
        q = nf4.quantize_4bit(W, double_quant=True, dq_lut_bins=bins)
        assert q.absmax.dtype == torch.uint8 and q.absmax2.shape == (-(-c.numel() // 256),)
        assert q.absmax_offset == pytest.approx(c.mean().item(), rel=1e-6)
        # the 8-bit dynamic map has a step of at most ~0.014 near |x| = 1, so c_hat is within 0.7% of c2
        c2 = q.absmax2[torch.arange(c.numel()) // 256]
        assert torch.all((nf4.block_absmax(q) - c).abs() <= 0.0075 * c2 + 1e-7)


def test_bits_per_param():
    W = torch.randn(256, 256)  # 65536 weights = 1024 blocks of 64 = 4 blocks of 256 absmaxes
    assert nf4.bits_per_param(nf4.quantize_4bit(W, double_quant=False)) == 4.5
    expected = 4 + 8 / 64 + (4 * 32 + 32) / 65536
    assert nf4.bits_per_param(nf4.quantize_4bit(W, double_quant=True)) == pytest.approx(expected)  # 4.127


def test_dequantize_dtype_and_constant_block():
    W = torch.zeros(4, 64, dtype=torch.bfloat16)
    W[1] = 0.5
    q = nf4.quantize_4bit(W)
    out = nf4.dequantize_4bit(q, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out[0], W[0])
    assert torch.allclose(out[1].float(), W[1].float(), rtol=0.01)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="quant_type"):
        nf4.quantize_4bit(torch.randn(8, 8), quant_type="int4")
    with pytest.raises(ConfigError, match="blocksize"):
        nf4.quantize_4bit(torch.randn(8, 8), blocksize=0)
    with pytest.raises(ConfigError, match="floating-point tensor"):
        nf4.quantize_4bit(torch.arange(8))
    with pytest.raises(ConfigError, match="dq_lut_bins"):
        nf4.quantize_4bit(torch.randn(8, 8), dq_lut_bins=1)


def test_state_dict_round_trip():
    W = weight((32, 96), seed=3, dtype=torch.bfloat16)
    for dq in (False, True):
        q = nf4.quantize_4bit(W, double_quant=dq)
        back = nf4.from_bnb_state_dict(nf4.to_bnb_state_dict(q, "w"), "w")
        assert back.shape == q.shape and back.dtype == torch.bfloat16 and back.double_quant == dq
        assert torch.equal(nf4.dequantize_4bit(back), nf4.dequantize_4bit(q))


# ---------------------------------------------------------------- bit-exactness against bitsandbytes


@pytest.fixture
def bnb_F():
    # bitsandbytes wraps some CPU fallbacks in torch.compile when imported; eager gives the same numbers
    # without compiling a graph per shape (no effect if it was imported already)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHDYNAMO_DISABLE", "1")
        import bitsandbytes  # a dev dependency: missing, the comparisons fail rather than skip
    return bitsandbytes.functional


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_bitsandbytes(bnb_F, shape, quant_type, double_quant):
    for seed, dtype in ((0, torch.float32), (1, torch.bfloat16)):
        W = weight(shape, seed=seed, dtype=dtype)
        packed, state = bnb_F.quantize_4bit(W, blocksize=64, compress_statistics=double_quant,
                                            quant_type=quant_type)
        q = nf4.quantize_4bit(W, quant_type, blocksize=64, double_quant=double_quant)
        assert torch.equal(packed.reshape(-1), q.packed)
        assert torch.equal(state.absmax, q.absmax)
        assert torch.equal(state.code, nf4.code_table(quant_type))
        if double_quant:
            assert state.offset.item() == q.absmax_offset
            assert torch.equal(state.state2.absmax, q.absmax2)
            assert torch.equal(state.state2.code, q.absmax_code)
            assert state.state2.blocksize == q.dq_blocksize == 256
        ref = bnb_F.dequantize_4bit(packed, state)
        assert ref.dtype == dtype
        assert torch.equal(ref.reshape(W.shape), nf4.dequantize_4bit(q, dtype))


def test_blockwise_8bit_matches_bitsandbytes(bnb_F):
    code = nf4.dynamic_map_8bit()
    assert torch.equal(code, bnb_F.create_dynamic_map())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256 * 40 + 17, generator=g) * torch.rand(256 * 40 + 17, generator=g) ** 4
    ref_q, ref_state = bnb_F.quantize_blockwise(x, blocksize=256)
    q, absmax = nf4.quantize_blockwise_8bit(x, code, 256)
    assert torch.equal(ref_q, q) and torch.equal(ref_state.absmax, absmax)
    assert torch.equal(bnb_F.dequantize_blockwise(ref_q, ref_state),
                       nf4.dequantize_blockwise_8bit(q, absmax, code, 256))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_matches_bitsandbytes(bnb_F, quant_type):
    W = weight((64, 192), seed=4, dtype=torch.float16)
    packed, state = bnb_F.quantize_4bit(W, compress_statistics=True, quant_type=quant_type)
    ours = nf4.to_bnb_state_dict(nf4.quantize_4bit(W, quant_type), prefix="weight")
    ref = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    assert ours.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k
    loaded = bnb_F.QuantState.from_dict({k[len("weight."):]: v for k, v in ours.items() if k != "weight"},
                                        device=torch.device("cpu"))
    assert torch.equal(bnb_F.dequantize_4bit(ours["weight"], loaded), bnb_F.dequantize_4bit(packed, state))
