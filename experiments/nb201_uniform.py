"""NAS-Bench-201 on CIFAR-10: a weight-sharing supernet trained on uniformly sampled single paths (SPOS),
with PA&DA's training settings: the baseline of the sampler comparison (ranking consistency).

  tanglenas search --config experiments/nb201_uniform.py --data-dir PATH/TO/cifar-10-batches-py
  tanglenas search --config experiments/nb201_uniform.py --smoke  # synthetic data in CIFAR-10's shape
  tanglenas rank runs/nb201_uniform-seed0 --benchmark PATH/TO/nb201_cifar10.pkl
"""

from presets import PADA_NB201, experiment


def get_config(smoke: bool = False):
  return experiment("nb201", "spos", mode="ws", sampler="uniform", **PADA_NB201, smoke=smoke)
