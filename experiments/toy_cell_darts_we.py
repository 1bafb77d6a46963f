"""Toy cell space on Fashion-MNIST, weight entanglement, DARTS (first order); 50 epochs as TangleNAS.

  tanglenas search --config experiments/toy_cell_darts_we.py [--smoke]
"""

from presets import toy_cell


def get_config(smoke: bool = False):
  return toy_cell("darts", "we", smoke=smoke)
