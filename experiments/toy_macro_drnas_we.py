"""Toy conv macro space on CIFAR-10, weight entanglement, DrNAS, with TangleNAS's conv-macro settings
(configs/search/toy_conv_macro-drnas.config): 100 epochs, weights trained by Adam at 3e-4 annealed to 1e-4.

  tanglenas search --config experiments/toy_macro_drnas_we.py --data-dir PATH/TO/cifar-10-batches-py
  tanglenas search --config experiments/toy_macro_drnas_we.py --smoke  # synthetic data in CIFAR-10's shape
  # with the table: --benchmark PATH/TO/conv_macro_bench.pkl
"""

from presets import TOY_MACRO, experiment


def get_config(smoke: bool = False):
  return experiment("toy_macro", "drnas", mode="we", **TOY_MACRO, smoke=smoke)
