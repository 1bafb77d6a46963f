"""Toy cell space on Fashion-MNIST, weight entanglement, SPOS (uniform single paths); 250 epochs as TangleNAS.

  tanglenas search --config experiments/toy_cell_spos_we.py [--smoke]
"""

from presets import toy_cell


def get_config(smoke: bool = False):
  return toy_cell("spos", "we", smoke=smoke)
