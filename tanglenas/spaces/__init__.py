"""Search spaces by name. `get_space("toy_cell", channels=16)` builds a configured space."""

from __future__ import annotations

from tanglenas.registry import Registry
from tanglenas.spaces.base import ChoiceMask, Genotype, Space, count_params
from tanglenas.spaces.toy_cell import ToyCellSpace

SPACES: Registry[Space] = Registry("search space")
SPACES.register("toy_cell")(ToyCellSpace)


def get_space(name: str, **options) -> Space:
  factory = SPACES.get(name)
  try:
    return factory(**options)
  except TypeError as e:
    raise ValueError(f"bad options for search space {name!r}: {e}") from None


def names() -> list[str]:
  return SPACES.names()


__all__ = ["ChoiceMask", "Genotype", "Space", "SPACES", "count_params", "get_space", "names"]
