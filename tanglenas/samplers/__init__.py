"""Path/data samplers by name: `get_sampler("uniform", config, space)`.

none (the strategy's mixture), uniform (uniform single paths); pada and gm register here too.
"""

from __future__ import annotations

from tanglenas.config import Config
from tanglenas.registry import Registry
from tanglenas.samplers.base import Sampler, Stats
from tanglenas.samplers.gm import gm_sampler
from tanglenas.samplers.pada import pada_sampler
from tanglenas.samplers.uniform import no_sampler, uniform_sampler
from tanglenas.spaces.base import Space

SAMPLERS: Registry[Sampler] = Registry("sampler")
SAMPLERS.register("none")(no_sampler)
SAMPLERS.register("uniform")(uniform_sampler)
SAMPLERS.register("pada")(pada_sampler)
SAMPLERS.register("gm")(gm_sampler)


def get_sampler(name: str, config: Config, space: Space) -> Sampler:
  """The sampler `name` for `space`, configured by `config`."""
  return SAMPLERS.get(name)(config, space)


def names() -> list[str]:
  return SAMPLERS.names()


__all__ = ["SAMPLERS", "Sampler", "Stats", "get_sampler", "names"]
