"""Search spaces by name. `get_space("toy_cell", channels=16)` builds a configured space."""

from __future__ import annotations

from tanglenas.registry import Registry
from tanglenas.spaces.autoformer import AutoFormerSpace
from tanglenas.spaces.base import ChoiceMask, Genotype, Space, count_params
from tanglenas.spaces.darts import DartsSpace
from tanglenas.spaces.mobilenet import MobileNetV3Space
from tanglenas.spaces.nanogpt import NanoGPTSpace
from tanglenas.spaces.nb201 import NB201Space
from tanglenas.spaces.toy_cell import ToyCellSpace
from tanglenas.spaces.toy_macro import ToyMacroSpace

SPACES: Registry[Space] = Registry("search space")
SPACES.register("toy_cell")(ToyCellSpace)
SPACES.register("toy_macro")(ToyMacroSpace)
SPACES.register("nb201")(NB201Space)
SPACES.register("darts")(DartsSpace)
SPACES.register("autoformer")(AutoFormerSpace)
SPACES.register("mobilenetv3")(MobileNetV3Space)
SPACES.register("nanogpt")(NanoGPTSpace)


def get_space(name: str, **options) -> Space:
  factory = SPACES.get(name)
  for option, value in options.items():
    if option == "dropout":  # a rate; `--space-option dropout=0` gives the int 0
      if isinstance(value, (int, float)) and not 0 <= value < 1:
        raise ValueError(f"space option dropout of {name!r} must lie in [0, 1), got {value!r}")
      continue
    sizes = value if isinstance(value, (tuple, list)) else (value,)  # sizes, counts and shapes: positive integers
    if any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in sizes):
      raise ValueError(f"space option {option} of {name!r} must be positive, got {value!r}")
  try:
    return factory(**options)
  except TypeError as e:
    raise ValueError(f"bad options for search space {name!r}: {e}") from None


def names() -> list[str]:
  return SPACES.names()


__all__ = ["ChoiceMask", "Genotype", "Space", "SPACES", "count_params", "get_space", "names"]
