"""NAS-Bench-201 on CIFAR-10: gradient matching (GM-NAS, Hu et al., ICLR 2022) with DARTS, splitting the
supernet after epochs 15 and 30 as the authors' GM+DARTS command (WS-GM/README, --split_ckpts 15,30).

  tanglenas search --config experiments/nb201_gm.py --data-dir PATH/TO/cifar-10-batches-py
  tanglenas search --config experiments/nb201_gm.py --smoke  # synthetic data in CIFAR-10's shape
"""

from presets import GM_DARTS, experiment


def get_config(smoke: bool = False):
  return experiment("nb201", "darts", mode="ws", **GM_DARTS, smoke=smoke)
