"""Architecture strategies by name: `get_strategy("darts", config)`.

darts (first order), darts2 (exact second order), drnas (Dirichlet), gdas (hard Gumbel, straight-through),
spos (uniform single paths, no architecture step), fixed (one given genotype).
"""

from __future__ import annotations

from tanglenas.config import Config
from tanglenas.registry import Registry
from tanglenas.spaces.base import Space
from tanglenas.strategies.base import ArchState, Strategy, arch_optimizer
from tanglenas.strategies.darts import darts, darts2, sparsemax, unrolled_value_and_grad
from tanglenas.strategies.discrete import fixed, spos
from tanglenas.strategies.drnas import drnas
from tanglenas.strategies.gdas import gdas

STRATEGIES: Registry[Strategy] = Registry("strategy")
STRATEGIES.register("darts")(darts)
STRATEGIES.register("darts2")(darts2)
STRATEGIES.register("drnas")(drnas)
STRATEGIES.register("gdas")(gdas)
STRATEGIES.register("spos")(spos)
STRATEGIES.register("fixed")(fixed)


def get_strategy(name: str, config: Config, *, space: Space | None = None,
                 total_steps: int | None = None) -> Strategy:
  """The strategy `name` configured by `config`.

  Args:
    name: one of `names()`.
    config: hyperparameters (architecture optimizer, mixture function, GDAS temperatures, DrNAS KL weight).
    space: the search space; needed by `fixed` to parse `config.genotype`.
    total_steps: the number of search steps; needed by `gdas` to anneal its temperature.
  """
  return STRATEGIES.get(name)(config, space=space, total_steps=total_steps)


def names() -> list[str]:
  return STRATEGIES.names()


__all__ = ["ArchState", "STRATEGIES", "Strategy", "arch_optimizer", "get_strategy", "names", "sparsemax",
           "unrolled_value_and_grad"]
