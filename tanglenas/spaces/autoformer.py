"""AutoFormer's vision-transformer space (Chen et al., ICCV 2021), as TangleNAS searches it: "autoformer".

One embedding width for the whole network, a depth, and per layer an MLP ratio and a head count:
AutoFormer-T has embedding {192, 216, 240}, depth {12, 13, 14}, MLP ratio {3.5, 4} and heads {3, 4} with a
head dimension of 64, i.e. 3 * (4^12 + 4^13 + 4^14) distinct networks. The network is a ViT: a patch
embedding (a linear map of flattened patches, the same as AutoFormer's stride-p convolution), a class token
and position embedding sliced to the chosen width, pre-norm blocks, a final layer norm and a linear head on
the class token. Presets:
- "paper": AutoFormer-T's choices on CIFAR-10 at 32x32 (patch 4: 64 patches + the class token). AutoFormer
  itself trains at 224x224 on ImageNet; 32x32 inputs keep the token count of TangleNAS's CIFAR runs small
  (tanglenas.data's downsampled ImageNet32 has the same shape; ImageNet16 with `image_size=16`).
- "tiny": Fashion-MNIST 28x28x1, patch 7, embedding {24, 32}, depth {2, 3}, heads {1, 2} of dimension 8, MLP
  ratio {2, 4}: for tests, notebooks and CPU runs.
Not reproduced from AutoFormer's published commands (`--gp --change_qk --relative_position`): global average
pooling instead of the class token, and 2-D relative position encodings; this ViT uses the class token and
absolute position embeddings. TangleNAS's CIFAR runs use patch 2 at 32x32 (`patch=2`; 256 tokens).

Genotype string (JSON, only the layers inside the depth):
`{"embed": 240, "depth": 13, "mlp_ratio": [3.5, 4.0, ...], "heads": [3, 4, ...]}`.
`TransformerSpace` holds what this space shares with nanoGPT's (tanglenas/spaces/nanogpt.py): decisions,
genotype strings, the block stack and its choice masks.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tanglenas.nn import masks as masks_lib
from tanglenas.nn.arch import Decision, check_mode, init_arch
from tanglenas.nn.attention import TransformerBlock
from tanglenas.nn.depth import DepthGate, DepthGated, depth_use, mix_depths
from tanglenas.nn.linear import EntangledEmbed, EntangledLinear, prefixed, whole_weight_masks
from tanglenas.nn.norm import LayerNorm
from tanglenas.spaces.base import ChoiceMask, Genotype, Space

vit_init = nnx.initializers.truncated_normal(stddev=0.02)  # timm / AutoFormer


@dataclasses.dataclass(frozen=True)
class TransformerChoices:
  """The searchable sizes of a transformer space and the fixed head dimension."""

  embed: tuple[int, ...]
  depth: tuple[int, ...]
  mlp_ratio: tuple[float, ...]
  heads: tuple[int, ...]
  head_dim: int


def run_blocks(blocks: Sequence[TransformerBlock], x: jax.Array, mixture, depths: Sequence[int]) -> jax.Array:
  """The block stack under a mixture (None: a standalone stack, every block its only choice)."""
  choice = (lambda name: None) if mixture is None else mixture.__getitem__
  calls = [functools.partial(block, embed=choice("embed"), heads=choice(f"heads_{i}"),
                             mlp_ratio=choice(f"mlp_ratio_{i}")) for i, block in enumerate(blocks)]
  return mix_depths(calls, x, depths, choice("depth"))


def make_blocks(c: TransformerChoices, *, causal: bool, use_bias: bool, dropout: float, mode: str, kernel_init,
                rngs: nnx.Rngs, attn_dropout: float = 0.0, proj_init=None) -> nnx.List:
  """The deepest choice's blocks (see `TransformerBlock` for the arguments)."""
  return nnx.List([
      TransformerBlock(c.embed[-1], c.heads[-1], c.mlp_ratio[-1], head_dim=c.head_dim, embed_widths=c.embed,
                       head_counts=c.heads, mlp_ratios=c.mlp_ratio, causal=causal, use_bias=use_bias,
                       dropout=dropout, attn_dropout=attn_dropout, mode=mode, kernel_init=kernel_init,
                       proj_init=proj_init, rngs=rngs)
      for _ in range(c.depth[-1])])


class TransformerSpace(DepthGated, Space):
  """Decisions, genotype strings and choice masks shared by the transformer spaces.

  Decisions: `embed`, `depth`, then `mlp_ratio_{i}` and `heads_{i}` for every layer i of the deepest choice;
  a layer's choices matter only while i < depth (see `DepthGated`).
  """

  choices: TransformerChoices

  def _init_decisions(self, c: TransformerChoices) -> None:
    c = dataclasses.replace(c, embed=tuple(sorted(c.embed)), depth=tuple(sorted(c.depth)),
                            mlp_ratio=tuple(sorted(c.mlp_ratio)), heads=tuple(sorted(c.heads)))
    self.choices = c
    layers = range(c.depth[-1])
    self.decisions = (Decision("embed", c.embed), Decision("depth", c.depth),
                      *(Decision(f"mlp_ratio_{i}", c.mlp_ratio) for i in layers),
                      *(Decision(f"heads_{i}", c.heads) for i in layers))
    self.gates = {f"{kind}_{i}": DepthGate("depth", i) for kind in ("mlp_ratio", "heads") for i in layers}

  def format(self, indices: Sequence[int]) -> str:
    chosen = dict(zip((d.name for d in self.decisions), indices))
    c = self.choices
    depth = c.depth[chosen["depth"]]
    return json.dumps({"embed": c.embed[chosen["embed"]], "depth": depth,
                       "mlp_ratio": [c.mlp_ratio[chosen[f"mlp_ratio_{i}"]] for i in range(depth)],
                       "heads": [c.heads[chosen[f"heads_{i}"]] for i in range(depth)]})

  def parse(self, text: str) -> Genotype:
    try:
      arch = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      arch = None
    keys = ["embed", "depth", "mlp_ratio", "heads"]
    if not isinstance(arch, dict) or sorted(arch) != sorted(keys):
      raise ValueError(f"{self.name}: not a genotype string like {self.format([0] * len(self.decisions))}: "
                       f"{text[:80]!r}")
    c = self.choices

    def index(value, choices, what):
      if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{self.name}: {what} {value!r} is not one of {choices}")
      return choices.index(value)

    indices = {"embed": index(arch["embed"], c.embed, "embed"), "depth": index(arch["depth"], c.depth, "depth")}
    for kind in ("mlp_ratio", "heads"):
      values = arch[kind]
      if not isinstance(values, list) or len(values) != arch["depth"]:
        raise ValueError(f"{self.name}: {kind} needs one value per layer ({arch['depth']}), got {values!r}")
      for i in range(c.depth[-1]):
        indices[f"{kind}_{i}"] = index(values[i], getattr(c, kind), kind) if i < len(values) else 0
    return self.genotype(indices)

  def block_choice_masks(self, blocks: Sequence[TransformerBlock], path: tuple) -> list[ChoiceMask]:
    """Choice masks of the block stack at `path`: embed, per-layer heads / MLP ratio, and depth."""
    result = []
    for i, block in enumerate(blocks):
      here = path + (i,)
      for decision, kind in ((f"heads_{i}", "heads"), (f"mlp_ratio_{i}", "mlp_ratio"), ("embed", "embed")):
        result += [ChoiceMask(decision, here + p, m) for p, m in block.choice_masks(kind)]
      used = depth_use(self.choices.depth, i)
      if not used.all():
        result += [ChoiceMask("depth", here + p, m) for p, m in whole_weight_masks(block, used)]
    return result

  def embed_masks(self) -> np.ndarray:
    return masks_lib.prefix_masks(self.choices.embed)


def patchify(x_NHWC: jax.Array, patch: int) -> jax.Array:
  """[N, H, W, C] -> [N, (H/p)(W/p), p*p*C]: non-overlapping patches, row-major, each flattened (p, p, C)."""
  n, h, w, c = x_NHWC.shape
  x = x_NHWC.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


class VisionTransformer(nnx.Module):
  """The AutoFormer supernet, or (after `extract`) the standalone ViT of one genotype."""

  def __init__(self, c: TransformerChoices, *, image_shape: tuple[int, int, int], patch: int, num_classes: int,
               dropout: float, decisions: Sequence[Decision], mode: str, rngs: nnx.Rngs):
    h, w, channels = image_shape
    if h % patch or w % patch:
      raise ValueError(f"image {h}x{w} is not divisible into {patch}x{patch} patches")
    width = c.embed[-1]
    self.patch, self.embed_widths, self.depths = patch, c.embed, c.depth
    self.patch_embed = EntangledLinear(patch * patch * channels, width, out_widths=c.embed, rngs=rngs)
    self.cls_token = EntangledEmbed(1, width, widths=c.embed, embedding_init=vit_init, rngs=rngs)
    self.pos_embed = EntangledEmbed((h // patch) * (w // patch) + 1, width, widths=c.embed,
                                    embedding_init=vit_init, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.blocks = make_blocks(c, causal=False, use_bias=True, dropout=dropout, mode=mode, kernel_init=vit_init,
                              rngs=rngs)
    self.norm = LayerNorm(width)
    self.head = EntangledLinear(width, num_classes, in_widths=c.embed, kernel_init=vit_init, rngs=rngs)
    self.arch = init_arch(decisions)

  def __call__(self, x_NHWC: jax.Array, mixture=None, *, return_features: bool = False):
    embed = None if mixture is None else mixture["embed"]
    tokens = self.patch_embed(patchify(x_NHWC, self.patch), out=embed)
    cls = jnp.broadcast_to(self.cls_token.table(embed)[None], (tokens.shape[0], 1, tokens.shape[2]))
    x = jnp.concatenate([cls, tokens], axis=1) + self.pos_embed.table(embed)[None]
    x = run_blocks(self.blocks, self.dropout(x), mixture, self.depths)
    h = self.norm(x[:, 0], masks_lib.mix(embed, masks_lib.prefix_masks(self.embed_widths)))
    logits = self.head(h, in_=embed)
    return (logits, h) if return_features else logits

  def extract(self, embed: int, depth: int, heads: Sequence[int], mlp_ratios: Sequence[int]) -> VisionTransformer:
    """The standalone ViT of choice indices (per-layer lists cover the chosen depth), weights sliced."""
    width, layers = self.embed_widths[embed], self.depths[depth]
    new = nnx.eval_shape(lambda: self)  # an abstract copy of the structure, every part replaced below
    new.embed_widths, new.depths = (width,), (layers,)
    new.patch_embed = self.patch_embed.extract(out=embed)
    new.cls_token, new.pos_embed = self.cls_token.extract(embed), self.pos_embed.extract(embed)
    new.dropout = nnx.Dropout(self.dropout.rate, rngs=nnx.Rngs(0))
    new.blocks = nnx.List([self.blocks[i].extract(embed=embed, heads=heads[i], mlp_ratio=mlp_ratios[i])
                           for i in range(layers)])
    new.norm, new.head = self.norm.extract(width), self.head.extract(in_=embed)
    new.arch = nnx.Dict({})
    return new


PRESETS = {
    "paper": dict(choices=TransformerChoices(embed=(192, 216, 240), depth=(12, 13, 14), mlp_ratio=(3.5, 4.0),
                                             heads=(3, 4), head_dim=64),
                  image_shape=(32, 32, 3), patch=4, dataset="cifar10"),
    "tiny": dict(choices=TransformerChoices(embed=(24, 32), depth=(2, 3), mlp_ratio=(2, 4), heads=(1, 2),
                                            head_dim=8),
                 image_shape=(28, 28, 1), patch=7, dataset="fashion_mnist"),
}


class AutoFormerSpace(TransformerSpace):
  """AutoFormer's ViT space. Options: `preset` ("paper" | "tiny"), `num_classes`, `dropout` (on the
  embeddings and each residual branch); `image_size`, `channels`, `patch` (None: the preset's; e.g. 16, 3
  and 4 for downsampled ImageNet16). `ws` gives every head count and MLP ratio of a layer its own
  weights; the embedding width stays a shared prefix (see tanglenas/nn/attention.py)."""

  name = "autoformer"
  outside_cells = ("patch_embed", "pos_embed", "cls_token", "norm", "head")

  def __init__(self, preset: str = "paper", *, num_classes: int = 10, dropout: float = 0.0,
               image_size: int | None = None, channels: int | None = None, patch: int | None = None):
    if preset not in PRESETS:
      raise ValueError(f"unknown autoformer preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    self.preset, self.num_classes, self.dropout = preset, num_classes, dropout
    height, _, preset_channels = p["image_shape"]
    self.input_shape = (image_size or height, image_size or height, channels or preset_channels)
    self.patch, self.dataset = patch or p["patch"], p["dataset"]
    self._init_decisions(p["choices"])

  def supernet(self, *, mode: str = "we", rngs: nnx.Rngs) -> VisionTransformer:
    return VisionTransformer(self.choices, image_shape=self.input_shape, patch=self.patch,
                             num_classes=self.num_classes, dropout=self.dropout, decisions=self.decisions,
                             mode=check_mode(mode), rngs=rngs)

  def standalone(self, supernet: VisionTransformer, genotype: Genotype) -> VisionTransformer:
    chosen, layers = self.index_map(genotype), range(self.choices.depth[-1])
    return supernet.extract(chosen["embed"], chosen["depth"], [chosen[f"heads_{i}"] for i in layers],
                            [chosen[f"mlp_ratio_{i}"] for i in layers])

  def choice_masks(self, supernet: VisionTransformer) -> list[ChoiceMask]:
    embed = self.embed_masks()
    parts = (prefixed(("patch_embed",), supernet.patch_embed.choice_masks(out=embed))
             + prefixed(("cls_token",), supernet.cls_token.choice_masks())
             + prefixed(("pos_embed",), supernet.pos_embed.choice_masks())
             + [(("norm", "scale"), embed), (("norm", "bias"), embed)]
             + prefixed(("head",), supernet.head.choice_masks(in_=embed)))
    return [ChoiceMask("embed", p, m) for p, m in parts] + self.block_choice_masks(supernet.blocks, ("blocks",))
