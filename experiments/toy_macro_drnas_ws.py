"""Toy conv macro space on CIFAR-10, weight sharing, DrNAS; 100 epochs (TangleNAS's conv-macro runs).

  tanglenas search --config experiments/toy_macro_drnas_ws.py --data-dir PATH/TO/cifar-10-batches-py
  tanglenas search --config experiments/toy_macro_drnas_ws.py --smoke  # synthetic data in CIFAR-10's shape
"""

from presets import TOY_EPOCHS, experiment


def get_config(smoke: bool = False):
  return experiment("toy_macro", "drnas", mode="ws", epochs=TOY_EPOCHS["drnas"], smoke=smoke)
