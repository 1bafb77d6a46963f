"""The typed configuration of a search run: one frozen dataclass, overridable from the command line (tyro).

Experiments in `experiments/` are small Python files with `get_config(smoke: bool = False) -> Config`; the
CLI loads one and applies command-line overrides on top of it. Defaults are TangleNAS's search settings.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import typing
from pathlib import Path
from typing import Any, Literal, Union

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
  train_limit: int = 0  # use only this many training examples, and test examples (0: all); for smoke runs
  val_fraction: float = 0.5  # share of the training set held out for the architecture step
  augment: bool = True  # random crops and flips of CIFAR-10 / ImageNet training images (tanglenas/augment.py)

  # --- weights (TangleNAS defaults) ----------------------------------------------------------------------
  epochs: int = 50  # search epochs
  batch_size: int = 64  # examples per training batch (and per validation batch)
  weight_optimizer: Literal["sgd", "adam"] = "sgd"  # adam: Adam(0.9, 0.995), TangleNAS's macro-space runs
  learning_rate: float = 0.025  # cosine-annealed to `learning_rate_min`
  learning_rate_min: float = 1e-3
  momentum: float = 0.9  # sgd
  nesterov: bool = True  # sgd; TangleNAS's; the DARTS-derived code of PA&DA and GM-NAS uses plain momentum
  weight_decay: float = 5e-4
  grad_clip: float = 5.0  # global norm

  # --- architecture -------------------------------------------------------------------------------------
  arch_learning_rate: float = 3e-4  # Adam
  arch_beta1: float = 0.5
  arch_beta2: float = 0.999
  arch_weight_decay: float = 1e-3
  arch_warmup_epochs: int = 0  # the architecture stays fixed this many epochs while the weights train
  mixture: Literal["softmax", "sparsemax"] = "softmax"  # darts/darts2 mixture function
  drnas_kl_weight: float = 0.0  # DrNAS KL regularizer toward the uniform Dirichlet (off as in TangleNAS)
  gdas_tau_max: float = 10.0  # GDAS temperature, annealed linearly to `gdas_tau_min` over the search
  gdas_tau_min: float = 0.1

  # --- samplers -----------------------------------------------------------------------------------------
  pada_importance_weights: bool = False  # reweight by 1/(K p) and 1/(N q) (off, as in the PA&DA paper)
  gm_batches: int = 10  # R: batches averaged for gradient-matching scores (paper: 100)
  gm_split_epochs: tuple[int, ...] = ()  # epochs after which the supernet is split once more
  gm_reinit: bool = False  # children start from fresh weights and architecture (GM-NAS "restart"), not the parent's
  pada_tau_schedule: Literal["linear", "constant"] = "linear"  # PA&DA smoothing: epoch/epochs (paper) or pada_tau
  pada_tau: float = 0.5  # the constant schedule's smoothing, in [0, 1)

  # --- evaluation ---------------------------------------------------------------------------------------
  benchmark: str = ""  # path of a tabular benchmark (pickle) to judge the derived architecture
  eval_epochs: int = 0  # retrain the derived architecture from scratch for this many epochs (0: skip)
  # Strategies without architecture parameters (spos) derive by searching the trained supernet:
  spos_derive: Literal["evolution", "random"] = "evolution"  # evolutionary (SPOS) or random search
  spos_candidates: int = 100  # architectures scored on the trained supernet
  spos_eval_batches: int = 10  # validation batches each candidate's accuracy is measured on
  spos_recalibrate_batches: int = 0  # batches re-estimating batch-norm statistics per candidate (0: keep)

  # --- run ------------------------------------------------------------------------------------------------
  seed: int = 0  # seeds weights, data order and architecture sampling
  log_every: int = 50  # steps between metric syncs to the host
  checkpoint_every: int = 500  # steps between checkpoints (and one at the end)
  wandb_mode: Literal["offline", "online", "disabled"] = "offline"
  wandb_project: str = "tanglenas"
  quiet: bool = False  # no progress bar

  def replace(self, **changes) -> Config:
    return dataclasses.replace(self, **changes)


# --- experiments and validation ------------------------------------------------------------------------
def load_experiment(path: str | Path, *, smoke: bool = False) -> Config:
  """The Config of an experiment file: a Python file defining `get_config(smoke: bool = False) -> Config`."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"experiment file {path} not found: pass --config experiments/<name>.py")
  spec = importlib.util.spec_from_file_location(f"tanglenas_experiment_{path.stem}", path)
  if spec is None or path.suffix != ".py":
    raise ValueError(f"experiment file {path} is not a Python file: pass --config experiments/<name>.py")
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, str(path.parent))  # experiment files import their folder's shared presets
  try:
    spec.loader.exec_module(module)
  except ModuleNotFoundError as error:
    hint = " (experiment files import experiments/presets.py: copy it beside yours)" if error.name == "presets" else ""
    raise ValueError(f"experiment file {path} cannot be loaded: {error}{hint}") from None
  except SyntaxError as error:
    raise ValueError(f"experiment file {path} has a syntax error in line {error.lineno}: {error.msg}") from None
  finally:
    sys.path.remove(str(path.parent))
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"experiment file {path} defines no get_config(smoke: bool = False) -> Config")
  config = module.get_config(smoke=smoke)
  if not isinstance(config, Config):
    raise ValueError(f"get_config of {path} returned {type(config).__name__}, not a tanglenas Config")
  return config


# (field, rule as text, check): value ranges of single fields.
_RANGES = (
  ("seed", "in [0, 2**31)", lambda v: 0 <= v < 2**31),
  ("epochs", "at least 1", lambda v: v >= 1),
  ("batch_size", "at least 1", lambda v: v >= 1),
  ("train_limit", "0 (all examples) or positive", lambda v: v >= 0),
  ("val_fraction", "strictly between 0 and 1", lambda v: 0 < v < 1),
  ("learning_rate", "positive", lambda v: v > 0),
  ("learning_rate_min", "at least 0", lambda v: v >= 0),
  ("momentum", "in [0, 1)", lambda v: 0 <= v < 1),
  ("weight_decay", "at least 0", lambda v: v >= 0),
  ("grad_clip", "positive", lambda v: v > 0),
  ("arch_learning_rate", "positive", lambda v: v > 0),
  ("arch_beta1", "in [0, 1)", lambda v: 0 <= v < 1),
  ("arch_beta2", "in [0, 1)", lambda v: 0 <= v < 1),
  ("arch_weight_decay", "at least 0", lambda v: v >= 0),
  ("drnas_kl_weight", "at least 0", lambda v: v >= 0),
  ("gdas_tau_min", "positive", lambda v: v > 0),
  ("gm_batches", "at least 1", lambda v: v >= 1),
  ("pada_tau", "in [0, 1)", lambda v: 0 <= v < 1),
  ("eval_epochs", "at least 0", lambda v: v >= 0),
  ("spos_candidates", "at least 1", lambda v: v >= 1),
  ("spos_eval_batches", "at least 1", lambda v: v >= 1),
  ("spos_recalibrate_batches", "at least 0", lambda v: v >= 0),
  ("log_every", "at least 1", lambda v: v >= 1),
  ("checkpoint_every", "at least 1", lambda v: v >= 1),
)


def validate(config: Config, workdir: str | Path | None = None) -> None:
  """Check a run's configuration before anything is built, so that a mistake fails at once, in one line.

  Checks the names (space and its options, strategy, sampler, dataset) against the registries, the value
  range of every numeric field, combinations that cannot work (e.g. a path sampler with strategy `fixed`),
  that the dataset files and the benchmark file exist and the benchmark's keys are architectures of the
  space, and that `workdir` (when given) can be written. Raises ValueError or FileNotFoundError saying
  what is wrong and how to fix it.
  """
  from tanglenas import samplers, spaces, strategies  # lazy: validation imports what a run will use

  hints = typing.get_type_hints(Config)
  for field in dataclasses.fields(Config):
    allowed = typing.get_args(hints[field.name]) if typing.get_origin(hints[field.name]) is Literal else None
    if allowed and getattr(config, field.name) not in allowed:
      raise ValueError(f"{field.name} is {getattr(config, field.name)!r}; choose one of {', '.join(allowed)}")
  for name, rule, ok in _RANGES:
    if not ok(getattr(config, name)):
      raise ValueError(f"{name} must be {rule}, got {getattr(config, name)!r}")
  space = spaces.get_space(config.space, **config.space_options)
  _check_name("strategy", config.strategy, strategies.names())
  _check_name("sampler", config.sampler, samplers.names())
  _check_combinations(config, space)
  _check_dataset(config.dataset or space.dataset, config.data_dir)
  if config.benchmark:
    from tanglenas.benchmarks import TabularBenchmark

    TabularBenchmark.load(config.benchmark, space=space.name).check_keys(space.parse)
  if workdir is not None:
    _check_writable(Path(workdir))


def _check_name(kind: str, name: str, known: list[str]) -> None:
  if name not in known:
    raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(known)}")


def _check_combinations(config: Config, space: Any) -> None:
  if config.strategy == "fixed":
    if not config.genotype:
      raise ValueError("strategy fixed trains one architecture: give it with --genotype '<architecture string>'")
    space.parse(config.genotype)
    if config.sampler != "none":
      raise ValueError(f"sampler {config.sampler} samples paths of a supernet, but strategy fixed trains one "
                       "architecture: use --sampler none or another strategy")
  elif config.genotype:
    raise ValueError(f"genotype is only read by strategy fixed, not {config.strategy}: drop --genotype")
  if config.learning_rate_min > config.learning_rate:
    raise ValueError(f"learning_rate_min {config.learning_rate_min} exceeds learning_rate {config.learning_rate}")
  if config.gdas_tau_min > config.gdas_tau_max:
    raise ValueError(f"gdas_tau_min {config.gdas_tau_min} exceeds gdas_tau_max {config.gdas_tau_max}")
  if config.mixture != "softmax" and config.strategy not in ("darts", "darts2"):
    raise ValueError(f"mixture {config.mixture} is only used by strategies darts and darts2, not "
                     f"{config.strategy}: pass --mixture softmax")
  if config.drnas_kl_weight and config.strategy != "drnas":
    raise ValueError(f"drnas_kl_weight is only used by strategy drnas, not {config.strategy}")
  if config.drnas_kl_weight and config.arch_weight_decay:
    raise ValueError("DrNAS regularizes its architecture by either the KL term or L2 weight decay, not both: with "
                     "--drnas-kl-weight give --arch-weight-decay 0")
  if config.strategy == "darts2" and config.weight_optimizer != "sgd":
    raise ValueError(f"darts2's virtual step is DARTS's SGD step, but the weights train with "
                     f"{config.weight_optimizer}: use --weight-optimizer sgd or strategy darts")
  if config.strategy == "darts2" and config.sampler in ("uniform", "pada"):
    raise ValueError(f"darts2 differentiates through a weight step on its own mixture, but sampler {config.sampler} "
                     "trains sampled paths: use --sampler none or gm, or strategy darts")
  if config.arch_warmup_epochs and config.strategy in ("spos", "fixed"):
    raise ValueError(f"arch_warmup_epochs delays the architecture step, but strategy {config.strategy} has none: "
                     "drop --arch-warmup-epochs")
  if not 0 <= config.arch_warmup_epochs < config.epochs:
    raise ValueError(f"arch_warmup_epochs must lie in [0, epochs) = [0, {config.epochs}), got "
                     f"{config.arch_warmup_epochs}")
  if config.pada_importance_weights and config.sampler != "pada":
    raise ValueError(f"pada_importance_weights is only used by sampler pada, not {config.sampler}")
  if config.gm_split_epochs:
    if config.sampler != "gm":
      raise ValueError(f"gm_split_epochs is only used by sampler gm, not {config.sampler}")
    if any(not 0 < e < config.epochs for e in config.gm_split_epochs):
      raise ValueError(f"gm_split_epochs {config.gm_split_epochs} must lie strictly between 0 and epochs "
                       f"({config.epochs})")
  if config.gm_reinit and config.sampler != "gm":
    raise ValueError(f"gm_reinit is only used by sampler gm, not {config.sampler}")
  if config.sampler == "gm":
    from tanglenas.samplers.gm import check_split_epochs

    check_split_epochs(config, space)  # increasing, and no more splits than the space's decisions allow
  _check_task(config, space)


# Samplers a language model can use: PA&DA scores each example by the gradient of its one label.
LANGUAGE_MODEL_SAMPLERS = ("none", "uniform", "gm")


def _check_task(config: Config, space: Any) -> None:
  """Text datasets feed language-model spaces only, and those only samplers that need no per-example label."""
  from tanglenas.data import TEXT_DATASETS

  dataset = config.dataset or space.dataset
  if space.task == "language_model":
    if dataset not in TEXT_DATASETS:
      raise ValueError(f"space {space.name} is a language model over token windows; dataset {dataset} is not "
                       f"text: use --dataset {' or '.join(TEXT_DATASETS)}")
    if config.sampler not in LANGUAGE_MODEL_SAMPLERS:
      raise ValueError(f"sampler {config.sampler} scores each example by its one class label, but space "
                       f"{space.name} predicts every token of a window: use --sampler "
                       f"{', '.join(LANGUAGE_MODEL_SAMPLERS)}")
  elif dataset in TEXT_DATASETS:
    raise ValueError(f"dataset {dataset} holds token windows for language-model spaces (nanogpt), not for space "
                     f"{space.name}: pick that space's dataset or leave --dataset empty")


def _check_dataset(name: str, data_dir: str) -> None:
  """Cheap existence checks, without reading the files (loading happens once, when the run starts)."""
  from tanglenas import data

  if name == "text":
    if not data_dir or not Path(data_dir).is_file():
      raise FileNotFoundError(f"text file {data_dir or '(no --data-dir)'} not found: pass --data-dir the path "
                              "of a UTF-8 text file, e.g. tiny Shakespeare's input.txt")
    return
  _check_name("dataset", name, data.DATASETS.names())
  if name.startswith("synthetic") and data_dir:
    raise ValueError(f"dataset {name} is generated and reads no files, but --data-dir {data_dir} was given: "
                     "drop --data-dir, or pass --dataset with the dataset it holds (e.g. cifar10)")
  if name == "fashion_mnist":
    root = Path(data_dir) if data_dir else data.FASHION_MNIST_DIR
    missing = [f for f in data.FASHION_MNIST_FILES.values() if not (root / f).is_file()]
    if missing:
      raise FileNotFoundError(f"Fashion-MNIST files {', '.join(missing)} not found in {root}: run `apt-get "
                              "install -y dataset-fashion-mnist` or pass --data-dir the folder holding them")
  elif name == "cifar10":
    root = Path(data_dir) if data_dir else None
    if root is None or not any((d / data.CIFAR10_TEST_FILE).is_file() for d in (root, root / data.CIFAR10_SUBDIR)):
      raise FileNotFoundError(f"CIFAR-10 batches not found in {root or '(no --data-dir)'}: pass --data-dir the "
                              "folder holding data_batch_1..5 and test_batch")
  elif name in ("imagenet", "imagenet16_120"):
    if not data_dir or data.find_imagenet_file(Path(data_dir), data.IMAGENET_VAL_FILE) is None:
      raise FileNotFoundError(f"downsampled ImageNet not found in {data_dir or '(no --data-dir)'}: pass --data-dir "
                              "the folder holding train_data_batch_1..10 and val_data (\"Downsampled ImageNet\", "
                              "image-net.org)")


def _check_writable(workdir: Path) -> None:
  existing = workdir
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir() or not os.access(existing, os.W_OK):
    raise ValueError(f"run directory {workdir} cannot be written (at {existing}): pass a writable --workdir")
