"""NAS-Bench-201 on CIFAR-10: PA&DA (Lu et al., CVPR 2023), paths and data importance-sampled by their
gradient norms, with the authors' training settings (nasbench201/train_panda_201.py).

  tanglenas search --config experiments/nb201_pada.py --data-dir PATH/TO/cifar-10-batches-py
  tanglenas search --config experiments/nb201_pada.py --smoke  # synthetic data in CIFAR-10's shape
  tanglenas rank runs/nb201_pada-seed0 --benchmark PATH/TO/nb201_cifar10.pkl
"""

from presets import PADA_NB201, experiment


def get_config(smoke: bool = False):
  return experiment("nb201", "spos", mode="ws", sampler="pada", **PADA_NB201, smoke=smoke)
