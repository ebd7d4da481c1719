"""Pruning: unstructured and N:M masks, structured pruning (whole heads, channels, layers) and the encodings of
sparse weights. Submodules are imported on use (they pull in torch and transformers):
`slimlm.pruning.methods` (magnitude, Wanda, SparseGPT), `slimlm.pruning.structured` (prune_structured),
`slimlm.pruning.storage` (compress_sparse, decompress_sparse). Saving and loading: slimlm.formats."""
