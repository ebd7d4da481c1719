"""File formats, each one entry of the format registry (slimlm.registry.register_format).

    slimlm               slimlm's own folder: any mix of packed integer, NF4/FP4, LLM.int8() and sparse
                         weights, and per-layer sizes of structured pruning (native.py)
    hf                   a plain transformers folder (hf.py)
    bitsandbytes         transformers' bitsandbytes 4-bit / 8-bit checkpoints (bnb.py)
    gptq, gptq_v2        GPTQ checkpoints (gptq.py)
    compressed-tensors   pack-quantized or sparse-bitmask checkpoints (compressed_tensors.py)
    gguf                 one GGUF file for llama.cpp (gguf.py: tensors and hyperparameters; gguf_vocab.py:
                         the tokenizer keys; the blocks themselves in slimlm.core.gguf_blocks)

folder.py holds what they share: reading and writing config, tensors, tokenizer, and building an empty
skeleton to load weights into.
"""
