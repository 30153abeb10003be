"""The registry of SAE families: `@register("name")` on a family's class makes it known to the CLI,
the loaders and the evaluators. The family modules of hsae.models are discovered (imported once, on
first use of the registry), so a new family is one new file; modules that register nothing (base,
codes, auxk, jump, partition, penalty) are imported too, harmlessly."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from hsae.errors import HsaeError

if TYPE_CHECKING:
    from hsae.models.base import SAE

_FAMILIES: dict[str, type[SAE]] = {}
_discovered = False

S = TypeVar("S", bound="type[SAE]")


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
    package = __name__.rsplit(".", 1)[0]
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not info.ispkg and not info.name.startswith("_") and info.name != "registry":
            importlib.import_module(f"{package}.{info.name}")


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
