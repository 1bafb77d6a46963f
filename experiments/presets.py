"""What the experiment files in this folder share (this file is not an experiment itself).

Every experiment is a small file with `get_config(smoke: bool = False) -> Config` built by `experiment()`
below, and its run command in its docstring. `smoke=True` shrinks a run to about a minute on a laptop CPU:
the space's tiny widths, a few hundred examples, one epoch (two for the samplers that change at an epoch's
end: gradient matching splits after the first, PA&DA samples the second's data by importance); everything
else stays as in the experiment, so the smoke run exercises the same code paths (except augmentation:
the synthetic data standing in for CIFAR-10 and text has none).
"""

from __future__ import annotations

from typing import Any

from tanglenas.config import Config

# TangleNAS's search epochs on its toy spaces, per strategy (darts2 as darts).
TOY_EPOCHS = {"darts": 50, "darts2": 50, "drnas": 100, "gdas": 250, "spos": 250}

# Per space: the options and data of its smoke run. Spaces whose data is not installed here (CIFAR-10, text)
# smoke-test on synthetic data drawn in the space's input shape (synthetic_text: a learnable token stream).
SMOKE: dict[str, dict[str, Any]] = {
  # XLA's own depthwise conv: at smoke size compiling dominates, and it compiles ~2x faster than the shifted
  # slices; full runs keep the CPU-fast shifted form.
  "toy_cell": dict(space_options={"channels": 4, "impl": "lax"}, train_limit=2048),
  "toy_macro": dict(dataset="synthetic"),
  # (256 synthetic examples: PA&DA's 10% validation share would not fill one batch)
  "nb201": dict(space_options={"channels": 4, "cells": 1}, dataset="synthetic", val_fraction=0.5),
  "darts": dict(space_options={"layers": 2, "channels": 4}, dataset="synthetic"),
  "autoformer": dict(space_options={"preset": "tiny"}, train_limit=1024),
  "mobilenetv3": dict(space_options={"preset": "tiny"}, dataset="synthetic"),
  "nanogpt": dict(space_options={"preset": "tiny"}, dataset="synthetic_text"),
}
SMOKE_RUN = dict(epochs=1, batch_size=32, log_every=4, checkpoint_every=1000, eval_epochs=0, gm_batches=2,
                 spos_candidates=8, spos_eval_batches=2)


def experiment(space: str, strategy: str, *, smoke: bool, **settings: Any) -> Config:
  """The Config of one experiment: `settings` override the defaults (TangleNAS's), `smoke` shrinks it."""
  config = Config(space=space, strategy=strategy, **settings)
  if not smoke:
    return config
  preset = SMOKE[space]
  options = {**config.space_options, **preset.get("space_options", {})}
  epochs = 2 if config.sampler in ("gm", "pada") else SMOKE_RUN["epochs"]
  split_epochs = (1,) if config.gm_split_epochs else ()
  warmup = 1 if config.arch_warmup_epochs else 0  # (two epochs at most: the architecture learns in the second)
  return config.replace(**{**SMOKE_RUN, **preset, "epochs": epochs, "space_options": options,
                           "gm_split_epochs": split_epochs, "arch_warmup_epochs": warmup})


def toy_cell(strategy: str, mode: str, *, smoke: bool) -> Config:
  """TangleNAS's toy cell search on Fashion-MNIST: DARTS under weight entanglement mixes with sparsemax, as
  TangleNAS's code does; weight sharing with softmax."""
  mixture = "sparsemax" if strategy in ("darts", "darts2") and mode == "we" else "softmax"
  learning_rate = 0.01 if strategy == "spos" else Config.learning_rate  # TangleNAS's toy_cell-spos.config
  return experiment("toy_cell", strategy, mode=mode, epochs=TOY_EPOCHS[strategy], mixture=mixture,
                    learning_rate=learning_rate, smoke=smoke)


# TangleNAS's conv macro search (configs/search/toy_conv_macro-drnas.config; search/experiment_search.py's
# Adam, weight decay 5e-4).
TOY_MACRO = dict(epochs=TOY_EPOCHS["drnas"], weight_optimizer="adam", learning_rate=3e-4, learning_rate_min=1e-4,
                 weight_decay=5e-4)
# PA&DA's NAS-Bench-201 supernet training (github.com/ShunLu91/PA-DA, nasbench201/train_panda_201.py):
# SGD lr 0.05 with plain momentum, cosine-annealed to 0, weight decay 2.5e-4, batch 256, 250 epochs. The
# authors train on all 50k CIFAR-10 training images and score on the test set; here 10% of the training set
# is held out to score paths on, so that the test set stays unseen.
PADA_NB201 = dict(epochs=250, learning_rate=0.05, learning_rate_min=0.0, nesterov=False, weight_decay=2.5e-4,
                  batch_size=256, val_fraction=0.1)
# GM-NAS's DARTS-space supernet training (WS-GM, sota/cnn/train_search_ws.py on DARTS's train_search.py):
# DARTS's SGD, plain momentum, weight decay 3e-4.
GM_DARTS = dict(epochs=50, nesterov=False, weight_decay=3e-4, sampler="gm", gm_split_epochs=(15, 30))
# The authors' GM + DARTS (2nd order) command on NAS-Bench-201 (WS-GM/README: ws-so-darts-201.sh --split_ckpts
# 15,30 --projection_warmup_epoch 30 --fs_opt 1 --restart final): 30 + 30 epochs, --fs_opt's Nesterov SGD,
# batch 48, weight decay 5e-4, the architecture fixed until the last split.
GM_NB201 = dict(epochs=60, nesterov=True, batch_size=48, weight_decay=5e-4, sampler="gm", gm_split_epochs=(15, 30),
                arch_warmup_epochs=30)
