"""slimlm's integer grid against compressed-tensors' (llm-compressor's RTN): the same scales, zero points and
rounded weights, except where w / s is an exact tie, which the two break in a different order."""
import pytest
import torch

# compressed-tensors is a dev dependency (pyproject.toml): a missing install fails this file rather than skipping it.
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams

from slimlm.core import quant as Q


def _theirs(W: torch.Tensor, bits: int, symmetric: bool, group_size: int) -> torch.Tensor:
    if group_size > 0:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group",
                                group_size=group_size)
        Wg = W.reshape(W.shape[0], -1, group_size)
        scale, zero = calculate_qparams(Wg.amin(-1), Wg.amax(-1), args)
    else:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="channel")
        scale, zero = calculate_qparams(W.amin(-1, keepdim=True), W.amax(-1, keepdim=True), args)
    return fake_quantize(W, scale, zero, args)


def _ours(W: torch.Tensor, bits: int, symmetric: bool, group_size: int) -> torch.Tensor:
    s, z = Q.group_qparams(W, bits, symmetric, group_size)
    idx = Q.default_g_idx(W.shape[1], group_size).long()
    return Q.fake_quantize(W, s[:, idx], z[:, idx], bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [64, -1])
def test_same_weights_as_compressed_tensors_off_ties(bits, symmetric, group_size):
    W = torch.randn(48, 256, generator=torch.Generator().manual_seed(bits)) * 0.05
    W[:, 3] += 0.2   # a skewed range, so asymmetric zero points are not all mid-grid
    ours, theirs = _ours(W, bits, symmetric, group_size), _theirs(W, bits, symmetric, group_size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_exact_ties_break_differently_when_the_zero_point_is_odd():
    # one group of 8: min -0.5, max 1.0 -> s = 0.1 at 4 bits, z = round(5) = 5 (odd); w = 0.25 is w / s = 2.5
    # on the nose (a tie). slimlm: round(2.5) + 5 = 2 + 5 = 7 -> 0.2; compressed-tensors: round(2.5 + 5 - 8)
    # on its signed grid = round(-0.5) = -0 -> code 8 in unsigned terms -> 0.3.
    W = torch.tensor([[-0.5, 1.0, 0.25, 0.0, 0.1, 0.2, 0.4, 0.6]], dtype=torch.float32)
    s, z = Q.group_qparams(W, 4, False, 8)
    assert z.item() == 5 and (W[0, 2] / s[0, 0]).item() == 2.5
    ours, theirs = _ours(W, 4, False, 8), _theirs(W, 4, False, 8)
    assert ours[0, 2].item() == pytest.approx(0.2) and theirs[0, 2].item() == pytest.approx(0.3)
    others = torch.ones_like(W, dtype=torch.bool)
    others[0, 2] = False
    torch.testing.assert_close(ours[others], theirs[others], rtol=0, atol=1e-6)
