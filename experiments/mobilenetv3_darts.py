"""Once-for-All's MobileNetV3 space (width multiplier 1.2), weight entanglement, DARTS (first order), on CIFAR-10 at 32x32:
TangleNAS searches it on ImageNet, which tanglenas.data does not ship; 100 epochs.

  tanglenas search --config experiments/mobilenetv3_darts.py --data-dir PATH/TO/cifar-10-batches-py [--smoke]
"""

from presets import experiment


def get_config(smoke: bool = False):
  return experiment("mobilenetv3", "darts", space_options={"preset": "paper", "image_size": 32, "num_classes": 10},
                    dataset="cifar10", epochs=100, smoke=smoke)
