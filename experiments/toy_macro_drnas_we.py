"""Toy conv macro space on CIFAR-10, weight entanglement, DrNAS; 100 epochs (TangleNAS's conv-macro runs).

  tanglenas search --config experiments/toy_macro_drnas_we.py --data-dir PATH/TO/cifar-10-batches-py
  tanglenas search --config experiments/toy_macro_drnas_we.py --smoke  # synthetic data in CIFAR-10's shape
  # with the table: --benchmark PATH/TO/conv_macro_bench.pkl
"""

from presets import TOY_EPOCHS, experiment


def get_config(smoke: bool = False):
  return experiment("toy_macro", "drnas", mode="we", epochs=TOY_EPOCHS["drnas"], smoke=smoke)
