"""Quantization methods and their runtime modules.

Import the submodules directly (`slimlm.quant.methods`, `slimlm.quant.linear`, ...); this package imports
nothing heavy on its own. Saving and loading: slimlm.formats.
"""
