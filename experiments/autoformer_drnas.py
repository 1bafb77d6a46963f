"""AutoFormer-T on CIFAR-10 (32x32, patch 4), weight entanglement, DrNAS: TangleNAS's run (1500 epochs,
batch 64, half the training set for the architecture step). The weights use tanglenas's SGD, not
AutoFormer's AdamW.

  tanglenas search --config experiments/autoformer_drnas.py --data-dir PATH/TO/cifar-10-batches-py [--smoke]
"""

from presets import experiment


def get_config(smoke: bool = False):
  return experiment("autoformer", "drnas", space_options={"preset": "paper"}, epochs=1500, batch_size=64,
                    smoke=smoke)
