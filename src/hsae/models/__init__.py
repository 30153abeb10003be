"""SAE families: the interface (base.py), one module per family, the registry (registry.py) and the
sparse training path (sparse/). See docs/architecture.md."""

from hsae.models.base import SAE, SAEOutput, StepContext, load
from hsae.models.codes import Codes, SparseCodes, to_dense
from hsae.models.registry import families, get_family, register

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
