"""Pruning: unstructured and N:M masks, structured pruning (whole heads, channels, layers) and compact
storage of sparse weights. Submodules are imported on use (they pull in torch and transformers):
`slimlm.pruning.structured` (prune_structured, load_structured), `slimlm.pruning.storage` (compress_sparse,
save_sparse, load_sparse, save_sparse_compressed_tensors)."""
