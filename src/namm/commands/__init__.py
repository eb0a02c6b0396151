"""Sub-commands of the ``namm`` CLI: every module here with an ``add_parser(subparsers)`` function
is a command (found automatically, listed alphabetically in ``namm --help``)."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def command_modules() -> list[ModuleType]:
    """The command modules of this package, by name."""
    modules = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    return [m for m in modules if hasattr(m, "add_parser")]
