"""The top-level API stays callable whatever subpackages were imported."""


def test_api_functions_are_not_shadowed_by_subpackages():
    import slimlm.pruning.methods  # noqa: F401
    import slimlm.quant.linear  # noqa: F401
    import slimlm.training.loop  # noqa: F401
    for name in ("prune", "quantize", "evaluate", "load_model", "load_tokenizer", "save_model", "calibration_data",
                 "export", "train"):
        assert callable(getattr(slimlm, name)), name


def test_registry_lists_every_method_and_rejects_unknown_names():
    import pytest

    from slimlm import registry
    from slimlm.errors import SlimlmError

    assert {"magnitude", "wanda", "sparsegpt", "structured"} <= set(registry.methods("prune"))
    with pytest.raises(SlimlmError, match="choose one of: .*sparsegpt"):
        registry.get("prune", "nope")


def test_no_method_config_field_is_shadowed_by_a_command_option():
    """Every registered config of every family: no field shares a name with the family command's own options
    (it could never be set from the CLI), and the command's own options are exactly what the registry reserves."""
    import dataclasses

    from slimlm import registry
    from slimlm.cli import _family_command, _train_command

    for name, fam in registry.families().items():
        for method in registry.methods(name).values():
            fields = {f.name for f in dataclasses.fields(method.config_cls)}
            assert not fields & fam.reserved, (method.name, fields & fam.reserved)
        build = _train_command if fam.command in ("train", "distill") else _family_command
        own = {p.name for p in build(name).params} - {
            f.name for m in registry.methods(name).values() for f in dataclasses.fields(m.config_cls)}
        if "model_ref" in own:                      # --model's parameter name
            own = own - {"model_ref"} | {"model"}
        assert own == fam.reserved, (name, own ^ fam.reserved)


def test_registering_a_clashing_config_is_refused():
    import dataclasses

    import pytest

    from slimlm import registry

    @dataclasses.dataclass
    class Clashing:
        batch_size: int = 1

    with pytest.raises(ValueError, match="Clashing has a field 'batch_size'.*--batch-size"):
        registry.register("quantize", "clashing", Clashing)
    assert "clashing" not in registry.methods("quantize")


def test_every_registered_config_is_importable_from_the_package():
    """`from slimlm import GPTQConfig` for every method of every family, and it is the registered class."""
    import slimlm
    from slimlm import registry

    for family in registry.families():
        for method in registry.methods(family).values():
            assert getattr(slimlm, method.config_cls.__name__) is method.config_cls
            assert method.config_cls.__name__ in slimlm.__all__
