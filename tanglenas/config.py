"""The typed configuration of a search run: one frozen dataclass, overridable from the command line (tyro).

Experiments in `experiments/` are small Python files with `get_config(smoke: bool = False) -> Config`; the
CLI loads one and applies command-line overrides on top of it. Defaults are TangleNAS's search settings.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Union

Scalar = Union[int, float, str, bool]


@dataclasses.dataclass(frozen=True)
class Config:
  # --- what is searched ------------------------------------------------------------------------------
  space: str = "toy_cell"  # search space registry name (tanglenas.spaces.names())
  space_options: dict[str, Scalar] = dataclasses.field(default_factory=dict)  # passed to the space class
  mode: Literal["we", "ws"] = "we"  # weight entanglement or weight sharing
  strategy: str = "darts"  # architecture optimizer: darts, darts2, drnas, gdas, spos, fixed
  sampler: str = "none"  # path/data sampler: none, uniform, pada, gm
  genotype: str = ""  # the architecture string trained by strategy `fixed`

  # --- data --------------------------------------------------------------------------------------------
  dataset: str = ""  # empty: the space's own dataset (fashion_mnist, cifar10, text)
  data_dir: str = ""  # empty: the dataset's default location (Debian's package for Fashion-MNIST)
  train_limit: int = 0  # use only this many training examples (0: all); for smoke runs
  val_fraction: float = 0.5  # share of the training set held out for the architecture step

  # --- weights (TangleNAS defaults) ----------------------------------------------------------------------
  epochs: int = 50
  batch_size: int = 64
  learning_rate: float = 0.025  # SGD, cosine-annealed to `learning_rate_min`
  learning_rate_min: float = 1e-3
  momentum: float = 0.9  # Nesterov
  weight_decay: float = 5e-4
  grad_clip: float = 5.0  # global norm

  # --- architecture -------------------------------------------------------------------------------------
  arch_learning_rate: float = 3e-4  # Adam
  arch_beta1: float = 0.5
  arch_beta2: float = 0.999
  arch_weight_decay: float = 1e-3
  mixture: Literal["softmax", "sparsemax"] = "softmax"  # darts/darts2 mixture function
  drnas_kl_weight: float = 0.0  # DrNAS KL regularizer toward the uniform Dirichlet (off as in TangleNAS)
  gdas_tau_max: float = 10.0  # GDAS temperature, annealed linearly to `gdas_tau_min` over the search
  gdas_tau_min: float = 0.1

  # --- samplers -----------------------------------------------------------------------------------------
  pada_importance_weights: bool = False  # reweight by 1/(K p) and 1/(N q) (off, as in the PA&DA paper)
  gm_batches: int = 10  # R: batches averaged for gradient-matching scores (paper: 100)
  gm_split_epochs: tuple[int, ...] = ()  # epochs after which the supernet is split once more

  # --- evaluation ---------------------------------------------------------------------------------------
  benchmark: str = ""  # path of a tabular benchmark (pickle) to judge the derived architecture
  eval_epochs: int = 0  # retrain the derived architecture from scratch for this many epochs (0: skip)

  # --- run ------------------------------------------------------------------------------------------------
  seed: int = 0
  log_every: int = 50  # steps between metric syncs to the host
  checkpoint_every: int = 500  # steps between checkpoints (and one at the end)
  wandb_mode: Literal["offline", "online", "disabled"] = "offline"
  wandb_project: str = "tanglenas"
  quiet: bool = False  # no progress bar

  def replace(self, **changes) -> Config:
    return dataclasses.replace(self, **changes)
