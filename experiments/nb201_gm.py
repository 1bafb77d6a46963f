"""NAS-Bench-201 on CIFAR-10: gradient matching (GM-NAS, Hu et al., ICLR 2022) with second-order DARTS,
splitting the supernet after epochs 15 and 30, with the training settings of the authors' GM + DARTS (2nd)
command (WS-GM/README: ws-so-darts-201.sh --split_ckpts 15,30 --projection_warmup_epoch 30 --fs_opt 1
--restart final), the architecture fixed until the last split. Not reproduced: that command's restart of the
weights at the last split (`--gm-reinit` restarts children at every split); scores average `gm_batches`
batches (the authors: 100).

  tanglenas search --config experiments/nb201_gm.py --data-dir PATH/TO/cifar-10-batches-py
  tanglenas search --config experiments/nb201_gm.py --smoke  # synthetic data in CIFAR-10's shape
"""

from presets import GM_NB201, experiment


def get_config(smoke: bool = False):
  return experiment("nb201", "darts2", mode="ws", **GM_NB201, smoke=smoke)
