"""The public surface is exactly ``__all__``, and every module is documented."""

from __future__ import annotations
import __future__

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import celery_batches

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(celery_batches.__path__, "celery_batches.")
)


def test_the_package_exports_exactly_its_public_names() -> None:
    # given what `import celery_batches` makes available
    public = sorted(
        name
        for name, value in vars(celery_batches).items()
        if not name.startswith("_")
        # Submodules become attributes once imported; `annotations` is the
        # __future__ feature flag. Neither is part of the API.
        and not isinstance(value, ModuleType)
        and value is not __future__.annotations
    )
    # then __all__ names those and __version__, nothing more or less
    assert celery_batches.__all__ == ["Batches", "SimpleRequest", "__version__"]
    assert sorted(celery_batches.__all__) == sorted([*public, "__version__"])


def test_the_version_is_a_dotted_string() -> None:
    parts = celery_batches.__version__.split(".")
    assert len(parts) >= 3
    assert all(part for part in parts)
    assert parts[0].isdigit() and parts[1].isdigit()


def test_there_are_modules_to_check() -> None:
    assert "celery_batches.task" in MODULES
    assert "celery_batches.request" in MODULES


@pytest.mark.parametrize("name", ["celery_batches", *MODULES])
def test_each_module_is_documented_and_its_all_is_real(name: str) -> None:
    module = importlib.import_module(name)
    # every module opens with a docstring of one summary line
    assert module.__doc__ and module.__doc__.strip()
    assert module.__doc__.strip().splitlines()[0].endswith(".")
    # and declares its public names, each of which exists and is unique
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = [member for member in exported if not hasattr(module, member)]
    assert missing == []
    assert len(set(exported)) == len(exported)


@pytest.mark.parametrize("name", ["celery_batches", *MODULES])
def test_each_public_function_and_class_of_a_module_is_in_its_all(name: str) -> None:
    # given the functions and classes a module defines without a leading
    # underscore (what a reader takes for its public surface)
    module = importlib.import_module(name)
    defined = {
        member
        for member, value in vars(module).items()
        if not member.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == name
    }
    # then __all__ lists each of them: nothing public goes unlisted
    assert defined - set(module.__all__) == set()
