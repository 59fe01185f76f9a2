"""The example registry: its module list names every module of the package, and an example's
declaration is one typed Example."""
import pkgutil

import pytest

from refnet import examples


def test_module_list_names_every_example_module():
    # _MODULES is the main job's order; a module left out of it would silently never register
    found = {m.name for m in pkgutil.iter_modules(examples.__path__) if not m.name.startswith("_")}
    assert sorted(examples._MODULES) == sorted(found)
    assert len(set(examples._MODULES)) == len(examples._MODULES)


def test_every_example_comes_from_a_listed_module():
    listed = {f"refnet.examples.{m}" for m in examples._MODULES}
    for ex in examples.all_examples().values():
        assert ex.run.__module__ in listed, ex.name


def test_declaration_is_checked():
    with pytest.raises(TypeError, match="unexpected keyword argument 'specs'"):
        examples.register("probe_not_registered", "t", None, specs=None)(lambda ctx: [])
    assert "probe_not_registered" not in examples.REGISTRY
    with pytest.raises(RuntimeError, match="registered twice"):
        examples.register("xor", "t", None)(lambda ctx: [])
