"""Toy cell space on Fashion-MNIST, weight entanglement, GDAS; 250 epochs as TangleNAS.

  tanglenas search --config experiments/toy_cell_gdas_we.py [--smoke]
"""

from presets import toy_cell


def get_config(smoke: bool = False):
  return toy_cell("gdas", "we", smoke=smoke)
