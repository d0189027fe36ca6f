"""One error tree: every error the package raises on purpose is a `moa.errors.MoAError`,
defined in `moa.errors`, and the CLI's exit code follows from where it sits in the tree."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import moa
from moa import errors
from moa.errors import USAGE_ERRORS, MoAError


def _modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(moa.__path__, "moa.")]


def test_every_error_class_of_the_package_is_in_the_one_tree() -> None:
    strays = []
    for name in _modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if not (inspect.isclass(value) and issubclass(value, BaseException)):
                continue
            if not value.__module__.startswith("moa.") or value.__name__.startswith("_"):
                continue  # someone else's error, or a private signal that never escapes
            if value.__module__ != "moa.errors" or not issubclass(value, MoAError):
                strays.append(f"{value.__module__}.{value.__name__}")
    assert strays == []


def test_the_tree_drawn_in_the_docstring_names_every_error() -> None:
    doc = errors.__doc__ or ""
    defined = [
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, MoAError)
    ]
    assert len(defined) > 20
    assert [name for name in defined if not re.search(rf"\b{name}\b", doc)] == []


def test_input_errors_are_usage_errors_and_output_errors_are_not() -> None:
    assert issubclass(errors.InputFileError, USAGE_ERRORS)
    for failure in (
        errors.OutputError,
        errors.BatchIncomplete,
        errors.WorkersFailed,
        errors.EvaluationFailed,
        errors.RunError,
        errors.ProviderError,
    ):
        assert not issubclass(failure, USAGE_ERRORS), failure
