"""DARTS space on CIFAR-10: gradient matching (GM-NAS) with DARTS, weight sharing; 50 epochs, splits after
epochs 15 and 30 (the split epochs of the authors' NAS-Bench-201 runs; their DARTS-space scripts differ).

  tanglenas search --config experiments/darts_gm.py --data-dir PATH/TO/cifar-10-batches-py
  tanglenas search --config experiments/darts_gm.py --smoke  # synthetic data in CIFAR-10's shape
"""

from presets import GM_DARTS, experiment


def get_config(smoke: bool = False):
  return experiment("darts", "darts", mode="ws", **GM_DARTS, smoke=smoke)
