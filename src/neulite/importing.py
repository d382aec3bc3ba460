"""Import paths ("package.module:function") naming a user's model or data set in a config.

A config is all a driver gets, so a user's own network or data must be nameable in it: the
`neulite` command, `neulite compare` and every Flower node (its own process) import the same
function from the same name. The current directory goes first on the module path, as with
`python -m`, so a module beside the user's config is found without installing it.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from neulite.errors import NeuliteError


def is_import_path(name: str) -> bool:
    return ":" in name


def import_object(path: str, what: str) -> Any:
    """The object `path` ("package.module:name") names; every failure is one line naming `what` and the path."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise NeuliteError(f"{what} {path!r} is not an import path: write it as 'package.module:function'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise NeuliteError(
                f"{what} {path!r}: no module {module_name!r} in the current directory ({os.getcwd()}) or the installed packages"
            ) from None
        raise NeuliteError(f"{what} {path!r}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise NeuliteError(f"{what} {path!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    try:
        found = functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise NeuliteError(f"{what} {path!r}: module {module_name!r} has no {attribute!r}") from None
    if not callable(found):
        raise NeuliteError(f"{what} {path!r} is a {type(found).__name__}, not a function")
    return found


F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[F]):
    """The names a config may give for one kind of user code (a model builder, a data loader): a
    built-in, a name registered from Python, or an import path.

    A name registered in Python exists only in that process: Flower's nodes and `neulite`
    commands in a shell need the import path ("module:function") instead.
    """

    def __init__(self, what: str, built_in: Mapping[str, F | None], on_register: Callable[[], None] = lambda: None):
        self.what, self.built_in, self._on_register = what, built_in, on_register
        self.registered: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: the config name `name` stands for the decorated function."""
        if not isinstance(name, str) or not name.strip() or is_import_path(name) or name in self.built_in:
            raise NeuliteError(
                f"cannot register {self.what} {name!r}: a name must be non-empty, without ':', and not a built-in "
                f"({', '.join(self.built_in)})"
            )

        def add(factory: F) -> F:
            self.registered[name] = factory
            self._on_register()
            return factory

        return add

    def resolve(self, name: str) -> F | None:
        """The function `name` stands for (a built-in's, None where built-ins have none); unknown
        names fail with one line that lists the valid ones."""
        if not isinstance(name, str):
            raise NeuliteError(f"{self.what} name must be a string, got {name!r}")
        if name in self.built_in:
            return self.built_in[name]
        if name in self.registered:
            return self.registered[name]
        if is_import_path(name):
            return import_object(name, self.what)
        registered = f"; registered: {', '.join(self.registered)}" if self.registered else ""
        raise NeuliteError(
            f"unknown {self.what} {name!r}: valid names are {', '.join(self.built_in)}{registered}; "
            "or an import path 'module:function'"
        )
