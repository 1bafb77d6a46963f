"""Toy cell space on Fashion-MNIST, weight sharing, DARTS (first order); 50 epochs as TangleNAS.

  tanglenas search --config experiments/toy_cell_darts_ws.py [--smoke]
"""

from presets import toy_cell


def get_config(smoke: bool = False):
  return toy_cell("darts", "ws", smoke=smoke)
