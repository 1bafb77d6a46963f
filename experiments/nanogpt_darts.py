"""nanoGPT's character-level language-model space on Tiny Shakespeare, weight entanglement, DARTS (first order):
TangleNAS's CharLM search (batch 16, 80% of the text for the weights).

  tanglenas search --config experiments/nanogpt_darts.py --data-dir PATH/TO/shakespeare.txt [--smoke]
"""

from presets import experiment


def get_config(smoke: bool = False):
  return experiment("nanogpt", "darts", space_options={"preset": "paper"}, batch_size=16, val_fraction=0.2,
                    epochs=10, smoke=smoke)
