"""Toy cell space on Fashion-MNIST, weight entanglement, DrNAS; 100 epochs as TangleNAS.

  tanglenas search --config experiments/toy_cell_drnas_we.py [--smoke]
"""

from presets import toy_cell


def get_config(smoke: bool = False):
  return toy_cell("drnas", "we", smoke=smoke)
