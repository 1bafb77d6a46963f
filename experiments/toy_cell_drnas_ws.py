"""Toy cell space on Fashion-MNIST, weight sharing, DrNAS; 100 epochs as TangleNAS.

  tanglenas search --config experiments/toy_cell_drnas_ws.py [--smoke]
"""

from presets import toy_cell


def get_config(smoke: bool = False):
  return toy_cell("drnas", "ws", smoke=smoke)
