"""SAE families. Each lives in its own module and registers itself with `@register`; the modules
of this package are discovered, so a new family is one new file."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from typing import TypeVar

from hsae.errors import HsaeError
from hsae.models.base import SAE, SAEOutput, StepContext, load
from hsae.models.codes import Codes, SparseCodes, to_dense

_FAMILIES: dict[str, type[SAE]] = {}
_INFRASTRUCTURE = {"base", "codes", "cpu_select", "kernels", "partition", "penalty", "prefix_step"}
_discovered = False

S = TypeVar("S", bound=type[SAE])


def register(name: str) -> Callable[[S], S]:
    """Class decorator: make a family available by `name` to the CLI, loaders and evaluators."""

    def wrap(cls: S) -> S:
        if name in _FAMILIES and _FAMILIES[name] is not cls:
            raise ValueError(f"SAE family {name!r} registered twice")
        cls.arch = name
        _FAMILIES[name] = cls
        return cls

    return wrap


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _INFRASTRUCTURE and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def families() -> dict[str, type[SAE]]:
    _discover()
    return dict(sorted(_FAMILIES.items()))


def get_family(name: str) -> type[SAE]:
    fams = families()
    if name not in fams:
        close = difflib.get_close_matches(name, list(fams), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise HsaeError(f"unknown SAE family {name!r}{hint}; known: {', '.join(fams)}")
    return fams[name]


__all__ = [
    "SAE",
    "SAEOutput",
    "StepContext",
    "Codes",
    "SparseCodes",
    "to_dense",
    "register",
    "families",
    "get_family",
    "load",
]
