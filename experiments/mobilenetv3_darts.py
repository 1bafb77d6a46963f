"""Once-for-All's MobileNetV3 space (width multiplier 1.2), weight entanglement, DARTS (first order), 100 epochs,
on CIFAR-10 at 32x32 or on downsampled ImageNet (Chrabaszcz et al., 2017; image-net.org's "Downsampled
ImageNet"), the CPU-sized stand-in for the 224x224 ImageNet TangleNAS searches it on: all 1000 classes at
32x32, or NAS-Bench-201's ImageNet16-120 (16x16, the first 120 classes).

  tanglenas search --config experiments/mobilenetv3_darts.py --data-dir PATH/TO/cifar-10-batches-py
  tanglenas search --config experiments/mobilenetv3_darts.py --smoke  # synthetic data in CIFAR-10's shape
  tanglenas search --config experiments/mobilenetv3_darts.py --dataset imagenet --num-classes 1000 \
    --data-dir PATH/TO/Imagenet32  # train_data_batch_1..10, val_data
  tanglenas search --config experiments/mobilenetv3_darts.py --dataset imagenet16_120 --image-size 16 \
    --num-classes 120 --data-dir PATH/TO/ImageNet16
"""

from presets import experiment


def get_config(smoke: bool = False):
  return experiment("mobilenetv3", "darts", space_options={"preset": "paper", "image_size": 32, "num_classes": 10},
                    dataset="cifar10", epochs=100, smoke=smoke)
