"""nanoGPT's character-level language-model space, as TangleNAS searches it: "nanogpt".

A GPT-2 style decoder (Karpathy's nanoGPT): token and position embeddings, pre-norm causal blocks, a final
layer norm and an output head tied to the token embedding (or untied). Searchable, as in TangleNAS: layers
{5, 6, 7}, embedding width {384, 576, 768} for the whole network, and per layer heads {6, 8, 12} and MLP
ratio {2, 3, 4}: 3 * (9^5 + 9^6 + 9^7) distinct networks.

Heads follow AutoFormer's convention (tanglenas/nn/attention.py): a fixed head dimension (64 here), so h
heads have query/key/value width 64h, whatever the embedding width. TangleNAS's nanoGPT code instead splits
the embedding width into h heads (head dimension embed / h); with a fixed head dimension one head count
keeps the same weights under every embedding width, which is what entangling them by prefix needs.

Input: int tokens [B, T] with T <= block_size; output logits [B, T, vocab]. Data: dataset "text" (a UTF-8
file cut into windows, `tanglenas.data.load_text_dataset`, e.g. Tiny Shakespeare) or "synthetic_text".
`language_model_metrics` gives the loss and bits per character.
Presets: "paper" (vocab 65 as Tiny Shakespeare, block 256, dropout 0.2) and "tiny" (tests, CPU).
As nanoGPT: dropout on the embeddings, each residual branch and the attention probabilities; weights drawn
with std 0.02, the residual projections (attention and MLP c_proj) with 0.02 / sqrt(2 L) for the deepest
choice's L layers. Not reproduced: its training script's `bias=False` (here `use_bias=True` by default, as
nanoGPT's model; layer norms keep a bias).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tanglenas.metrics import bits_per_char
from tanglenas.nn import masks as masks_lib
from tanglenas.nn.arch import Decision, check_mode, init_arch
from tanglenas.nn.linear import EntangledEmbed, EntangledLinear, prefixed
from tanglenas.nn.norm import LayerNorm
from tanglenas.spaces.autoformer import TransformerChoices, TransformerSpace, make_blocks, run_blocks
from tanglenas.spaces.base import ChoiceMask, Genotype

gpt_init = nnx.initializers.normal(0.02)  # nanoGPT


def residual_init(layers: int):
  """nanoGPT's (GPT-2's) initializer of the projections back into the residual stream."""
  return nnx.initializers.normal(0.02 / np.sqrt(2 * layers))


class GPT(nnx.Module):
  """The nanoGPT supernet, or (after `extract`) the standalone GPT of one genotype."""

  def __init__(self, c: TransformerChoices, *, vocab_size: int, block_size: int, tie_weights: bool,
               use_bias: bool, dropout: float, decisions: tuple[Decision, ...], mode: str, rngs: nnx.Rngs):
    width = c.embed[-1]
    self.block_size, self.embed_widths, self.depths = block_size, c.embed, c.depth
    self.wte = EntangledEmbed(vocab_size, width, widths=c.embed, embedding_init=gpt_init, rngs=rngs)
    self.wpe = EntangledEmbed(block_size, width, widths=c.embed, embedding_init=gpt_init, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    # nanoGPT: dropout on the attention probabilities too, and the residual projections (attention and MLP
    # c_proj) drawn with std 0.02 / sqrt(2 L), L the (deepest) number of layers, as GPT-2.
    self.blocks = make_blocks(c, causal=True, use_bias=use_bias, dropout=dropout, attn_dropout=dropout, mode=mode,
                              kernel_init=gpt_init, proj_init=residual_init(c.depth[-1]), rngs=rngs)
    self.ln_f = LayerNorm(width)
    self.lm_head = None if tie_weights else EntangledLinear(width, vocab_size, in_widths=c.embed, use_bias=False,
                                                            kernel_init=gpt_init, rngs=rngs)
    self.arch = init_arch(decisions)

  def __call__(self, tokens_BT: jax.Array, mixture=None, *, return_features: bool = False):
    t = tokens_BT.shape[1]
    if t > self.block_size:
      raise ValueError(f"sequence of {t} tokens is longer than the block size {self.block_size}")
    embed = None if mixture is None else mixture["embed"]
    x = self.wte(tokens_BT, width=embed) + self.wpe.table(embed)[None, :t]
    x = run_blocks(self.blocks, self.dropout(x), mixture, self.depths)
    h = self.ln_f(x, masks_lib.mix(embed, masks_lib.prefix_masks(self.embed_widths)))
    logits = self.wte.attend(h, width=embed) if self.lm_head is None else self.lm_head(h, in_=embed)
    return (logits, h) if return_features else logits

  def extract(self, embed: int, depth: int, heads, mlp_ratios) -> GPT:
    """The standalone GPT of choice indices (per-layer lists cover the chosen depth), weights sliced."""
    width, layers = self.embed_widths[embed], self.depths[depth]
    new = nnx.eval_shape(lambda: self)  # an abstract copy of the structure, every part replaced below
    new.embed_widths, new.depths = (width,), (layers,)
    new.wte, new.wpe = self.wte.extract(embed), self.wpe.extract(embed)
    new.dropout = nnx.Dropout(self.dropout.rate, rngs=nnx.Rngs(0))
    new.blocks = nnx.List([self.blocks[i].extract(embed=embed, heads=heads[i], mlp_ratio=mlp_ratios[i])
                           for i in range(layers)])
    new.ln_f = self.ln_f.extract(width)
    new.lm_head = None if self.lm_head is None else self.lm_head.extract(in_=embed)
    new.arch = nnx.Dict({})
    return new


PRESETS = {
    "paper": dict(choices=TransformerChoices(embed=(384, 576, 768), depth=(5, 6, 7), mlp_ratio=(2, 3, 4),
                                             heads=(6, 8, 12), head_dim=64),
                  vocab_size=65, block_size=256, dropout=0.2),
    "tiny": dict(choices=TransformerChoices(embed=(16, 32), depth=(1, 2), mlp_ratio=(2, 4), heads=(1, 2),
                                            head_dim=8),
                 vocab_size=32, block_size=16, dropout=0.0),
}


class NanoGPTSpace(TransformerSpace):
  """nanoGPT's space. Options: `preset` ("paper" | "tiny"), `vocab_size`, `block_size` and `dropout`
  (None: the preset's), `tie_weights` (output head = token embedding transposed), `use_bias` (in linear
  layers). `ws` gives every head count and MLP ratio of a layer its own weights; the embedding width stays a
  shared prefix (see tanglenas/nn/attention.py)."""

  name = "nanogpt"
  dataset = "text"
  task = "language_model"
  outside_cells = ("wte", "wpe", "ln_f", "lm_head")

  def __init__(self, preset: str = "paper", *, vocab_size: int | None = None, block_size: int | None = None,
               dropout: float | None = None, tie_weights: bool = True, use_bias: bool = True):
    if preset not in PRESETS:
      raise ValueError(f"unknown nanogpt preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    self.preset, self.tie_weights, self.use_bias = preset, tie_weights, use_bias
    self.num_classes = p["vocab_size"] if vocab_size is None else vocab_size
    self.block_size = p["block_size"] if block_size is None else block_size
    self.dropout = p["dropout"] if dropout is None else dropout
    self.input_shape = (self.block_size,)
    self._init_decisions(p["choices"])

  def supernet(self, *, mode: str = "we", rngs: nnx.Rngs) -> GPT:
    return GPT(self.choices, vocab_size=self.num_classes, block_size=self.block_size,
               tie_weights=self.tie_weights, use_bias=self.use_bias, dropout=self.dropout,
               decisions=self.decisions, mode=check_mode(mode), rngs=rngs)

  def standalone(self, supernet: GPT, genotype: Genotype) -> GPT:
    chosen, layers = self.index_map(genotype), range(self.choices.depth[-1])
    return supernet.extract(chosen["embed"], chosen["depth"], [chosen[f"heads_{i}"] for i in layers],
                            [chosen[f"mlp_ratio_{i}"] for i in layers])

  def choice_masks(self, supernet: GPT) -> list[ChoiceMask]:
    embed = self.embed_masks()
    parts = (prefixed(("wte",), supernet.wte.choice_masks()) + prefixed(("wpe",), supernet.wpe.choice_masks())
             + [(("ln_f", "scale"), embed), (("ln_f", "bias"), embed)])
    if supernet.lm_head is not None:
      parts += prefixed(("lm_head",), supernet.lm_head.choice_masks(in_=embed))
    return [ChoiceMask("embed", p, m) for p, m in parts] + self.block_choice_masks(supernet.blocks, ("blocks",))


def language_model_metrics(logits_BTV: jax.Array, targets_BT: jax.Array) -> dict[str, jax.Array]:
  """Mean next-token cross-entropy (nats) and bits per character (loss / ln 2) of a character model."""
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT))
  return {"loss": loss, "bits_per_char": bits_per_char(loss)}

