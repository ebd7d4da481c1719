"""Runtime quantized modules and their file formats.

Import the submodules directly (`slimlm.quant.linear`, `slimlm.quant.serialize`, `slimlm.quant.formats`);
this package imports nothing heavy on its own.
"""
