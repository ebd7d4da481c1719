"""2:4 semi-structured sparse kernels: the checks that run anywhere, and the swap itself where a CUDA GPU is."""
import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.pruning import semi_structured as S

from conftest import VOCAB, random_windows, tiny_model

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8),
                               reason="the 2:4 kernels need a CUDA GPU of compute capability >= 8.0")


def _prune_2_4(model):
    from slimlm import api
    from slimlm.pruning.configs import MagnitudeConfig

    api.prune(model, MagnitudeConfig(sparsity="2:4"))
    return model


def test_is_2_4():
    W = torch.randn(8, 16)
    assert not S.is_2_4(W)
    W2 = W * torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(8, 4)
    assert S.is_2_4(W2)
    W3 = W2.clone()
    W3[3, 5] = 1.0   # a third non-zero in one group of four
    assert not S.is_2_4(W3)
    assert S.is_2_4(torch.zeros(4, 8))
    assert not S.is_2_4(torch.zeros(4, 6))   # 6 inputs do not split into groups of four


def test_pruned_model_layers_are_2_4():
    model = _prune_2_4(tiny_model("llama"))
    lin = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert lin and all(S.is_2_4(m.weight) for m in lin)
    assert not S.is_2_4(model.lm_head.weight)


def test_cpu_model_is_refused_with_a_one_line_error():
    model = _prune_2_4(tiny_model("llama"))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(SlimlmError, match="CUDA GPU") as e:
        S.to_semi_structured(model)
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())   # nothing swapped
    with pytest.raises(SlimlmError, match="backend"):
        S.to_semi_structured(model, backend="magic")


def kernel_sized_llama():
    """A tiny Llama whose every block linear has both sides a multiple of 64 (q/o 128x128, k/v 64x128,
    gate/up 256x128, down 128x256): a shape both 2:4 backends tile (CUTLASS needs rows % 32 and
    columns % 64, cuSPARSELt multiples of 16 for float16)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@needs_gpu
def test_sparse_kernels_match_the_dense_model_on_gpu():
    model = _prune_2_4(kernel_sized_llama()).to("cuda", torch.float16)
    blocks = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in blocks}
    ids = random_windows(2, 32).cuda()
    with torch.no_grad():
        dense = model(input_ids=ids).logits.float()
        report = S.to_semi_structured(model)
        assert set(report["converted"]) == blocks, report["dense"]          # every 2:4 layer converts
        assert set(report["dense"]) == {"lm_head"}
        sparse = model(input_ids=ids).logits.float()
        assert (sparse - dense).norm() <= 1e-2 * dense.norm()
        assert S.to_dense(model) == len(blocks)
    assert all(torch.equal(model.get_submodule(n).weight, weights[n]) for n in blocks)   # the same dense weights


def test_the_gpu_test_model_has_shapes_both_kernels_tile():
    """Runs anywhere: the model of the GPU comparison above meets the float16 shape limits that PyTorch's
    CUTLASS and cuSPARSELt 2:4 tensors check, so on a GPU every block linear converts and is compared."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    shapes = [m.weight.shape for n, m in kernel_sized_llama().named_modules()
              if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert len(shapes) == 14
    for backend in (SparseSemiStructuredTensorCUTLASS, SparseSemiStructuredTensorCUSPARSELT):
        c = backend._DTYPE_SHAPE_CONSTRAINTS[torch.float16]
        assert all(r % c.sparse_min_rows == 0 and k % c.sparse_min_cols == 0 for r, k in shapes), (backend, shapes)


@needs_gpu
def test_sparse_linear_large_enough_for_the_kernels_on_gpu():
    lin = torch.nn.Linear(512, 256, bias=False).to("cuda", torch.float16)
    with torch.no_grad():
        lin.weight.mul_(torch.tensor([0, 1, 1, 0], device="cuda", dtype=torch.float16).repeat(256, 128))
        W = lin.weight.detach().clone()
        model = torch.nn.Sequential(lin)
        report = S.to_semi_structured(model)
        assert report["converted"] == ["0"], report
        x = torch.randn(64, 512, device="cuda", dtype=torch.float16)
        assert torch.allclose(model(x).float(), (x @ W.T).float(), rtol=1e-2, atol=1e-2)
        S.to_dense(model)
        assert torch.equal(model[0].weight, W)
