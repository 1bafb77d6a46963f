"""AutoFormer-T on CIFAR-10 (32x32, patch 4), weight entanglement, DrNAS: TangleNAS's run (1500 epochs,
batch 64, half the training set for the architecture step). The weights use tanglenas's SGD, not
AutoFormer's AdamW. On downsampled ImageNet at 32x32 (Chrabaszcz et al., 2017; image-net.org's "Downsampled
ImageNet"), the same 64 patches, 1000 classes; for ImageNet16-120 add "image_size": 16 to a copy's space_options.

  tanglenas search --config experiments/autoformer_drnas.py --data-dir PATH/TO/cifar-10-batches-py
  tanglenas search --config experiments/autoformer_drnas.py --smoke  # the tiny preset on Fashion-MNIST
  tanglenas search --config experiments/autoformer_drnas.py --dataset imagenet --num-classes 1000 \
    --data-dir PATH/TO/Imagenet32  # train_data_batch_1..10, val_data
"""

from presets import experiment


def get_config(smoke: bool = False):
  return experiment("autoformer", "drnas", space_options={"preset": "paper", "num_classes": 10}, epochs=1500,
                    batch_size=64, smoke=smoke)
