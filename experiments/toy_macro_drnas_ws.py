"""Toy conv macro space on CIFAR-10, weight sharing, DrNAS, with TangleNAS's conv-macro settings
(configs/search/toy_conv_macro-drnas.config): 100 epochs, weights trained by Adam at 3e-4 annealed to 1e-4.

  tanglenas search --config experiments/toy_macro_drnas_ws.py --data-dir PATH/TO/cifar-10-batches-py
  tanglenas search --config experiments/toy_macro_drnas_ws.py --smoke  # synthetic data in CIFAR-10's shape
"""

from presets import TOY_MACRO, experiment


def get_config(smoke: bool = False):
  return experiment("toy_macro", "drnas", mode="ws", **TOY_MACRO, smoke=smoke)
