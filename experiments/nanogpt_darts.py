"""nanoGPT's character-level language-model space on Tiny Shakespeare, weight entanglement, DARTS (first order):
TangleNAS's CharLM search (batch 16, 80% of the text for the weights). Not reproduced: the weights use
tanglenas's SGD, not nanoGPT's AdamW, and batches are fixed non-overlapping windows of the text, where
nanoGPT draws each window at a random offset.

  tanglenas search --config experiments/nanogpt_darts.py --data-dir PATH/TO/input.txt
  tanglenas search --config experiments/nanogpt_darts.py --smoke  # tiny model on synthetic text, no file

--data-dir is the text file itself (UTF-8, e.g. Tiny Shakespeare's input.txt, 65 characters); a file with more
distinct characters needs --vocab-size N, their number.
"""

from presets import experiment


def get_config(smoke: bool = False):
  return experiment("nanogpt", "darts", space_options={"preset": "paper", "vocab_size": 65}, batch_size=16,
                    val_fraction=0.2, epochs=10, smoke=smoke)
