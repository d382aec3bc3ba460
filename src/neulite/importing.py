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
from typing import Any

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
