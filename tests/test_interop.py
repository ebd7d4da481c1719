"""slimlm's exports loaded by the real consumers whose pins clash with ours, each in its own environment
(`make interop` builds them under .venv/interop/; `make test` builds them and fails without them):

- gptqmodel (with optimum, as transformers loads GPTQ checkpoints) pins numpy 2.2.6;
- sparse-bitmask decompression left compressed-tensors in 0.15, and transformers 5 needs >= 0.15, so the
  compressed-tensors sparse export is read by transformers 4.55.4 + compressed-tensors 0.10.2 (4.51.3 + 0.9.4
  read it too; 4.57.6 + 0.12.2 / 0.14.0.1 fail inside compressed-tensors, which compresses the
  meta-initialised model).

Each load runs in a subprocess of that environment's python; inputs and logits cross as safetensors files.
"""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from slimlm import export
from slimlm.core.quant import QuantResult, choose_qparams, default_g_idx, quantize_grouped, rtn_quantize
from slimlm.quant.linear import QuantLinear

from conftest import interop_python, random_windows, tiny_model


def run_in(python: str, script: str, *args) -> None:
    done = subprocess.run([python, "-c", script, *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


# ----------------------------------------------------------------------------------- GPTQ: gptqmodel
GPTQ_LOAD = """
import json, sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPTQConfig

ids = load_file(sys.argv[1])["ids"]
out, kernels = {}, {}
for folder in json.loads(sys.argv[3]):
    # backend="torch": gptqmodel's TorchLinear, w = (q - z) * s in float16, then an fp32 product
    for backend in ("torch", "auto"):
        qc = GPTQConfig(bits=json.load(open(folder + "/config.json"))["quantization_config"]["bits"],
                        backend=backend)
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32,
                                                     quantization_config=qc).eval()
        with torch.no_grad():
            out[f"{folder}:{backend}"] = model(input_ids=ids).logits
        kernels[f"{folder}:{backend}"] = type(model.model.layers[0].mlp.up_proj).__name__
save_file(out, sys.argv[2], metadata=kernels)
"""


def rtn_linears(model, bits, gs, sym, act_order):
    """Every block linear replaced by a QuantLinear of its RTN codes; act-order scatters each group's columns."""
    for i, (name, lin) in enumerate([(n, m) for n, m in model.named_modules()
                                     if isinstance(m, nn.Linear) and "lm_head" not in n]):
        W, K = lin.weight.detach(), lin.in_features
        if act_order:
            g_idx = torch.empty(K, dtype=torch.int32)
            g_idx[torch.randperm(K, generator=torch.Generator().manual_seed(i))] = (torch.arange(K) // gs).int()
            s, z = torch.ones(W.shape[0], K // gs), torch.zeros(W.shape[0], K // gs)
            for j in range(K // gs):
                sj, zj = choose_qparams(W[:, g_idx == j], bits, sym)
                s[:, j], z[:, j] = sj[:, 0], zj[:, 0]
            r = QuantResult(quantize_grouped(W, s, z, bits, g_idx), s, z, g_idx, bits, gs, sym)
        else:
            q, s, z = rtn_quantize(W, bits, sym, gs)
            r = QuantResult(q, s, z, default_g_idx(K, gs), bits, gs, sym)
        model.set_submodule(name, QuantLinear.from_result(r, lin.bias, method="rtn"))
    return model


def fp16_dequantized_logits(model, ids):
    """Logits of the float model a GPTQ loader computes with: scales stored as float16 and
    w = (q - z) * s rounded to float16, as gptqmodel's torch kernel dequantizes."""
    with torch.no_grad():
        for name, q in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
            g = q.g_idx.long()
            lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            lin.weight.copy_(((q.codes().float() - q.zero.float()[:, g]).half() * q.scale.half()[:, g]).float())
            if q.bias is not None:
                lin.bias.copy_(q.bias)
            model.set_submodule(name, lin)
        return model(input_ids=ids).logits


GPTQ_CASES = {   # (bits, group size, symmetric, act-order, checkpoint format)
    "4bit-g32-asym-act-order-v1": (4, 32, False, True, "gptq"),
    "4bit-g32-asym-act-order-v2": (4, 32, False, True, "gptq_v2"),
    "3bit-g32-sym": (3, 32, True, False, "gptq"),
    "8bit-per-channel-asym": (8, -1, False, False, "gptq"),
}


def test_gptq_export_loads_in_transformers_with_gptqmodel(tmp_path):
    """transformers + optimum + gptqmodel read each export. With gptqmodel's torch kernel the logits are
    those of the fp16-dequantized model to fp32 rounding (a wrong g_idx, zero-point convention or packing
    would be off by far more); the kernel it picks by default on a CPU (bf16 activations) stays within 30 dB."""

    python = interop_python("gptqmodel", "SLIMLM_GPTQMODEL_PYTHON")
    ids = random_windows(2, 12)
    expected = {}
    for case, (bits, gs, sym, act_order, fmt) in GPTQ_CASES.items():
        model = rtn_linears(tiny_model("llama"), bits, gs, sym, act_order)
        export(model, None, tmp_path / case, fmt)
        expected[case] = fp16_dequantized_logits(model, ids)
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    folders = [str(tmp_path / case) for case in GPTQ_CASES]
    run_in(python, GPTQ_LOAD, tmp_path / "ids.safetensors", tmp_path / "out.safetensors", json.dumps(folders))
    got = load_file(tmp_path / "out.safetensors")
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        kernels = f.metadata()
    for case, folder in zip(GPTQ_CASES, folders):
        assert kernels[f"{folder}:torch"] == "TorchLinear", kernels
        ref, auto = expected[case], got[f"{folder}:auto"]
        torch.testing.assert_close(got[f"{folder}:torch"], ref, msg=lambda m, case=case: f"{case}: {m}")
        sqnr = 10 * torch.log10(ref.pow(2).sum() / (auto - ref).pow(2).sum())
        assert sqnr > 30, (case, float(sqnr))


# ----------------------------------------------------------- compressed-tensors sparse-bitmask: legacy pair
CT_LOAD = """
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ref = load_file(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
with torch.no_grad():
    assert torch.equal(model(input_ids=ref["ids"]).logits, ref["logits"]), "logits differ"
"""


def magnitude_prune_(model, n_m=None):
    """Half of each row's weights (or m - n of each group of m) with the smallest magnitude set to zero."""
    with torch.no_grad():
        for lin in [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]:
            W = lin.weight
            rows = W.reshape(-1, n_m[1]) if n_m else W                      # a view: zeros land in W
            k = rows.shape[1] - n_m[0] if n_m else rows.shape[1] // 2
            rows.scatter_(1, rows.abs().argsort(1)[:, :k], 0.0)
    return model


@pytest.mark.parametrize("pattern", [None, (2, 4)], ids=["50%", "2:4"])
def test_transformers_loads_the_compressed_tensors_sparse_export(tmp_path, pattern):

    python = interop_python("legacy-ct", "SLIMLM_LEGACY_CT_PYTHON")
    model = magnitude_prune_(tiny_model("llama"), pattern)
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5
    export(model, None, tmp_path / "ct", "compressed-tensors")
    ids = random_windows(2, 10)
    with torch.no_grad():
        save_file({"ids": ids, "logits": model(input_ids=ids).logits}, tmp_path / "ref.safetensors")
    run_in(python, CT_LOAD, tmp_path / "ct", tmp_path / "ref.safetensors")
