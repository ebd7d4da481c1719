"""The top-level API stays callable whatever subpackages were imported."""


def test_api_functions_are_not_shadowed_by_subpackages():
    import slimlm.pruning.methods  # noqa: F401
    import slimlm.quant.linear  # noqa: F401
    for name in ("prune", "quantize", "evaluate", "load_model", "load_tokenizer", "save_model", "calibration_data"):
        assert callable(getattr(slimlm, name)), name


def test_registry_lists_every_method_and_rejects_unknown_names():
    import pytest

    from slimlm import registry
    from slimlm.errors import SlimlmError

    assert {"magnitude", "wanda", "sparsegpt", "structured"} <= set(registry.methods("prune"))
    with pytest.raises(SlimlmError, match="choose one of: .*sparsegpt"):
        registry.get("prune", "nope")
