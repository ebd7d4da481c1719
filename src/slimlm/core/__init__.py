"""Pure tensor math: no modules, hooks, I/O or globals. Shapes and equations are in the docstrings."""
