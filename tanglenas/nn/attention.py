"""Entangled transformer parts: self-attention with searchable head count and embedding width, an MLP whose
hidden width follows the embedding width and the MLP ratio, and the pre-norm block that holds them.

Conventions of AutoFormer (Chen et al., ICCV 2021, "AutoFormer: Searching Transformers for Visual
Recognition"): a head keeps a fixed dimension `head_dim`, so choosing h heads means query/key/value widths
h * head_dim (the first h heads of the super-projection) and an output projection from that width; the MLP's
hidden width is int(embed * ratio) of the chosen embedding width and ratio; layer norms normalize over the
chosen embedding prefix. Channels beyond the chosen embedding width stay zero along the residual stream.

`we` runs ONE attention on the masked super-projections. `ws` gives every head count (and every MLP ratio)
its own weights and sums the candidates' outputs with the mixture's weights. The embedding width is a
prefix in both modes: it is one global choice that every weight of the network depends on, and separating
it would mean one copy of the whole network per width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tanglenas.nn import masks as masks_lib
from tanglenas.nn.arch import check_mode
from tanglenas.nn.conv import default_init
from tanglenas.nn.linear import (EntangledLinear, MaskList, abstract, channels_last, choice_index, prefixed,
                                 sorted_choices, whole_weight_masks)
from tanglenas.nn.norm import LayerNorm


def _weights_or_last(weights_K: jax.Array | None, size: int) -> jax.Array:
  return jax.nn.one_hot(size - 1, size) if weights_K is None else weights_K


class EntangledAttention(nnx.Module):
  """Multi-head self-attention over [B, T, embed_dim] with searchable head count and embedding width.

  Args: `num_heads` the largest head count; `head_counts` its candidates (None: only `num_heads`);
  `head_dim` the fixed per-head width (64 in AutoFormer); `embed_widths` the embedding-width candidates;
  `causal` masks attention to later positions (GPT); `dropout` the rate of dropout on the attention
  probabilities (nanoGPT's `attn_dropout`, AutoFormer's `attn_drop`); `proj_init` the output projection's
  initializer (None: `kernel_init`; nanoGPT scales its residual projections).
  """

  def __init__(self, embed_dim: int, num_heads: int, *, head_dim: int, head_counts: Sequence[int] | None = None,
               embed_widths: Sequence[int] | None = None, causal: bool = False, use_bias: bool = True,
               dropout: float = 0.0, mode: str = "we", kernel_init=default_init, proj_init=None,
               rngs: nnx.Rngs):
    self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
    self.head_counts = sorted_choices(head_counts, num_heads, "head count")
    self.embed_widths = sorted_choices(embed_widths, embed_dim, "embedding width")
    self.causal, self.use_bias, self.mode = causal, use_bias, check_mode(mode)
    if self.mode == "ws":
      self.candidates = nnx.List([
          EntangledAttention(embed_dim, h, head_dim=head_dim, embed_widths=self.embed_widths, causal=causal,
                             use_bias=use_bias, dropout=dropout, kernel_init=kernel_init, proj_init=proj_init,
                             rngs=rngs) for h in self.head_counts])
      return
    self.attn_dropout = nnx.Dropout(dropout, rngs=rngs)
    qkv_widths = [h * head_dim for h in self.head_counts]

    def projection(in_features, out_features, in_widths, out_widths, init=kernel_init) -> EntangledLinear:
      return EntangledLinear(in_features, out_features, in_widths=in_widths, out_widths=out_widths,
                             use_bias=use_bias, kernel_init=init, rngs=rngs)

    inner = num_heads * head_dim
    self.query = projection(embed_dim, inner, self.embed_widths, qkv_widths)
    self.key = projection(embed_dim, inner, self.embed_widths, qkv_widths)
    self.value = projection(embed_dim, inner, self.embed_widths, qkv_widths)
    self.proj = projection(inner, embed_dim, qkv_widths, self.embed_widths, proj_init or kernel_init)

  def __call__(self, x_BTD: jax.Array, *, heads: jax.Array | None = None,
               embed: jax.Array | None = None) -> jax.Array:
    """`heads`, `embed`: mixture weights [K] over head counts / embedding widths; None = the largest."""
    if self.mode == "ws":
      if heads is None:
        return self.candidates[-1](x_BTD, embed=embed)
      return sum(heads[k] * c(x_BTD, embed=embed) for k, c in enumerate(self.candidates))
    b, t, _ = x_BTD.shape
    shape_BTNH = (b, t, self.num_heads, self.head_dim)
    q = self.query(x_BTD, out=heads, in_=embed).reshape(shape_BTNH)
    k = self.key(x_BTD, out=heads, in_=embed).reshape(shape_BTNH)
    v = self.value(x_BTD, out=heads, in_=embed).reshape(shape_BTNH)
    # Heads beyond the chosen count have zero query, key and value, so they add exactly zero.
    logits_BNTS = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(self.head_dim).astype(q.dtype)
    if self.causal:
      logits_BNTS = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits_BNTS, jnp.finfo(q.dtype).min)
    probs_BNTS = self.attn_dropout(jax.nn.softmax(logits_BNTS, axis=-1))
    y_BTNH = jnp.einsum("bnts,bsnh->btnh", probs_BNTS, v)
    return self.proj(y_BTNH.reshape(b, t, -1), out=embed, in_=heads)

  def extract(self, *, heads: int | None = None, embed: int | None = None) -> EntangledAttention:
    """The standalone attention of one choice (indices; None = largest), with sliced weights."""
    hi = choice_index(heads, self.head_counts)
    if self.mode == "ws":
      return self.candidates[hi].extract(embed=embed)
    ei = choice_index(embed, self.embed_widths)
    new = abstract(lambda rngs: EntangledAttention(self.embed_widths[ei], self.head_counts[hi],
                                                   head_dim=self.head_dim, causal=self.causal,
                                                   use_bias=self.use_bias, rngs=rngs))
    for name in ("query", "key", "value"):
      setattr(new, name, getattr(self, name).extract(out=hi, in_=ei))
    new.proj = self.proj.extract(out=ei, in_=hi)
    new.attn_dropout = nnx.Dropout(self.attn_dropout.rate, rngs=nnx.Rngs(0))
    return new

  def choice_masks(self, decision: str) -> MaskList:
    """(path, masks [K, ...]) of the weights that choice k of `decision` ("heads" or "embed") uses."""
    if decision not in ("heads", "embed"):
      raise ValueError(f"unknown attention decision {decision!r}; choose 'heads' or 'embed'")
    if self.mode == "ws":
      if decision == "heads":
        eye = np.eye(len(self.head_counts), dtype=np.float32)
        return [m for k, c in enumerate(self.candidates) for m in prefixed(("candidates", k),
                                                                            whole_weight_masks(c, eye[k]))]
      return [m for k, c in enumerate(self.candidates) for m in prefixed(("candidates", k), c.choice_masks("embed"))]
    head_masks = masks_lib.prefix_masks([h * self.head_dim for h in self.head_counts])
    embed_masks = masks_lib.prefix_masks(self.embed_widths)
    result = []
    for name in ("query", "key", "value"):
      layer = getattr(self, name)
      masks = layer.choice_masks(out=head_masks) if decision == "heads" else layer.choice_masks(in_=embed_masks)
      result += prefixed((name,), masks)
    proj = self.proj.choice_masks(in_=head_masks) if decision == "heads" else self.proj.choice_masks(out=embed_masks)
    return result + prefixed(("proj",), proj)


def hidden_widths(embed_widths: Sequence[int], ratios: Sequence[float]) -> tuple[int, ...]:
  """The distinct MLP hidden widths int(embed * ratio), increasing."""
  return tuple(sorted({int(e * r) for e in embed_widths for r in ratios}))


def gelu(x: jax.Array) -> jax.Array:
  """The exact (erf) GELU of PyTorch's `nn.GELU()`, which AutoFormer and nanoGPT use; jax.nn.gelu's default is
  the tanh approximation."""
  return jax.nn.gelu(x, approximate=False)


class EntangledMLP(nnx.Module):
  """fc1 (embed -> int(embed * ratio)), GELU, fc2 (-> embed), with searchable embedding width and ratio.

  The hidden width depends on both choices; in `we` its mixture over the distinct hidden widths is the outer
  product of the two mixtures. In `ws` every ratio has its own MLP (the embedding width stays a prefix).
  `proj_init` initializes fc2 (None: `kernel_init`).
  """

  def __init__(self, embed_dim: int, mlp_ratio: float, *, ratios: Sequence[float] | None = None,
               embed_widths: Sequence[int] | None = None, use_bias: bool = True, mode: str = "we",
               activation: Callable = gelu, kernel_init=default_init, proj_init=None, rngs: nnx.Rngs):
    self.embed_dim, self.mlp_ratio = embed_dim, mlp_ratio
    self.ratios = sorted_choices(ratios, mlp_ratio, "MLP ratio")
    self.embed_widths = sorted_choices(embed_widths, embed_dim, "embedding width")
    self.use_bias, self.mode, self.activation = use_bias, check_mode(mode), activation
    if self.mode == "ws":
      self.candidates = nnx.List([
          EntangledMLP(embed_dim, r, embed_widths=self.embed_widths, use_bias=use_bias, activation=activation,
                       kernel_init=kernel_init, proj_init=proj_init, rngs=rngs) for r in self.ratios])
      return
    self.hidden_widths = hidden_widths(self.embed_widths, self.ratios)
    hidden = self.hidden_widths[-1]
    self.fc1 = EntangledLinear(embed_dim, hidden, in_widths=self.embed_widths, out_widths=self.hidden_widths,
                               use_bias=use_bias, kernel_init=kernel_init, rngs=rngs)
    self.fc2 = EntangledLinear(hidden, embed_dim, in_widths=self.hidden_widths, out_widths=self.embed_widths,
                               use_bias=use_bias, kernel_init=proj_init or kernel_init, rngs=rngs)

  def _hidden_index(self, ei: int, ri: int) -> int:
    return self.hidden_widths.index(int(self.embed_widths[ei] * self.ratios[ri]))

  def hidden_mixture(self, embed: jax.Array | None, ratio: jax.Array | None) -> jax.Array | None:
    """Mixture over `hidden_widths`: sum over (embed e, ratio r) of w_e * w_r at the index of int(e * r)."""
    if embed is None and ratio is None:
      return None
    routing_ERH = np.zeros((len(self.embed_widths), len(self.ratios), len(self.hidden_widths)), np.float32)
    for ei in range(len(self.embed_widths)):
      for ri in range(len(self.ratios)):
        routing_ERH[ei, ri, self._hidden_index(ei, ri)] = 1.0
    w_e = _weights_or_last(embed, len(self.embed_widths))
    w_r = _weights_or_last(ratio, len(self.ratios))
    return jnp.einsum("e,r,erh->h", w_e, w_r, routing_ERH)

  def __call__(self, x: jax.Array, *, embed: jax.Array | None = None, ratio: jax.Array | None = None) -> jax.Array:
    """`embed`, `ratio`: mixture weights [K] over embedding widths / MLP ratios; None = the largest."""
    if self.mode == "ws":
      if ratio is None:
        return self.candidates[-1](x, embed=embed)
      return sum(ratio[k] * c(x, embed=embed) for k, c in enumerate(self.candidates))
    hidden = self.hidden_mixture(embed, ratio)
    return self.fc2(self.activation(self.fc1(x, out=hidden, in_=embed)), out=embed, in_=hidden)

  def extract(self, *, embed: int | None = None, ratio: int | None = None) -> EntangledMLP:
    ri = choice_index(ratio, self.ratios)
    if self.mode == "ws":
      return self.candidates[ri].extract(embed=embed)
    ei = choice_index(embed, self.embed_widths)
    new = abstract(lambda rngs: EntangledMLP(self.embed_widths[ei], self.ratios[ri], use_bias=self.use_bias,
                                             activation=self.activation, rngs=rngs))
    hi = self._hidden_index(ei, ri)
    new.fc1, new.fc2 = self.fc1.extract(out=hi, in_=ei), self.fc2.extract(out=ei, in_=hi)
    return new

  def choice_masks(self, decision: str) -> MaskList:
    """(path, masks [K, ...]) of the weights choice k of `decision` ("ratio" or "embed") uses; the hidden
    channels a choice uses are those of its largest hidden width over the other decision's choices."""
    if decision not in ("ratio", "embed"):
      raise ValueError(f"unknown MLP decision {decision!r}; choose 'ratio' or 'embed'")
    if self.mode == "ws":
      if decision == "ratio":
        eye = np.eye(len(self.ratios), dtype=np.float32)
        return [m for k, c in enumerate(self.candidates) for m in prefixed(("candidates", k),
                                                                            whole_weight_masks(c, eye[k]))]
      return [m for k, c in enumerate(self.candidates) for m in prefixed(("candidates", k), c.choice_masks("embed"))]
    hidden = self.hidden_widths[-1]
    if decision == "ratio":
      hidden_masks = masks_lib.prefix_masks([int(self.embed_widths[-1] * r) for r in self.ratios], hidden)
      return (prefixed(("fc1",), self.fc1.choice_masks(out=hidden_masks))
              + prefixed(("fc2",), self.fc2.choice_masks(in_=hidden_masks)))
    embed_masks = masks_lib.prefix_masks(self.embed_widths)
    hidden_masks = masks_lib.prefix_masks([int(e * self.ratios[-1]) for e in self.embed_widths], hidden)
    return (prefixed(("fc1",), self.fc1.choice_masks(out=hidden_masks, in_=embed_masks))
            + prefixed(("fc2",), self.fc2.choice_masks(out=embed_masks, in_=hidden_masks)))


class TransformerBlock(nnx.Module):
  """Pre-norm transformer block (ViT, GPT-2): x + attn(LN(x)), then x + mlp(LN(x)), dropout on each branch.

  Searchable: embedding width (shared with the rest of the network), head count and MLP ratio. `dropout`
  acts on each branch's output, `attn_dropout` on the attention probabilities; `proj_init` initializes the
  two projections back into the residual stream (None: `kernel_init`).
  """

  def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float, *, head_dim: int,
               embed_widths: Sequence[int] | None = None, head_counts: Sequence[int] | None = None,
               mlp_ratios: Sequence[float] | None = None, causal: bool = False, use_bias: bool = True,
               dropout: float = 0.0, attn_dropout: float = 0.0, mode: str = "we", kernel_init=default_init,
               proj_init=None, rngs: nnx.Rngs):
    self.embed_widths = sorted_choices(embed_widths, embed_dim, "embedding width")
    self.ln1 = LayerNorm(embed_dim)
    self.attn = EntangledAttention(embed_dim, num_heads, head_dim=head_dim, head_counts=head_counts,
                                   embed_widths=self.embed_widths, causal=causal, use_bias=use_bias,
                                   dropout=attn_dropout, mode=mode, kernel_init=kernel_init, proj_init=proj_init,
                                   rngs=rngs)
    self.ln2 = LayerNorm(embed_dim)
    self.mlp = EntangledMLP(embed_dim, mlp_ratio, ratios=mlp_ratios, embed_widths=self.embed_widths,
                            use_bias=use_bias, mode=mode, kernel_init=kernel_init, proj_init=proj_init, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x_BTD: jax.Array, *, embed: jax.Array | None = None, heads: jax.Array | None = None,
               mlp_ratio: jax.Array | None = None) -> jax.Array:
    mask = channels_last(masks_lib.mix(embed, masks_lib.prefix_masks(self.embed_widths)), x_BTD.ndim)
    x = x_BTD + self.dropout(self.attn(self.ln1(x_BTD, mask), heads=heads, embed=embed))
    return x + self.dropout(self.mlp(self.ln2(x, mask), embed=embed, ratio=mlp_ratio))

  def extract(self, *, embed: int | None = None, heads: int | None = None,
              mlp_ratio: int | None = None) -> TransformerBlock:
    ei = choice_index(embed, self.embed_widths)
    new = nnx.eval_shape(lambda: self)  # an abstract copy of the structure, every part replaced below
    new.embed_widths = (self.embed_widths[ei],)
    new.ln1, new.ln2 = self.ln1.extract(new.embed_widths[0]), self.ln2.extract(new.embed_widths[0])
    new.attn = self.attn.extract(heads=heads, embed=ei)
    new.mlp = self.mlp.extract(embed=ei, ratio=mlp_ratio)
    new.dropout = nnx.Dropout(self.dropout.rate, rngs=nnx.Rngs(0))
    return new

  def choice_masks(self, decision: str) -> MaskList:
    """(path, masks) of the weights choice k of `decision` ("embed", "heads" or "mlp_ratio") uses."""
    if decision == "heads":
      return prefixed(("attn",), self.attn.choice_masks("heads"))
    if decision == "mlp_ratio":
      return prefixed(("mlp",), self.mlp.choice_masks("ratio"))
    if decision != "embed":
      raise ValueError(f"unknown block decision {decision!r}; choose 'embed', 'heads' or 'mlp_ratio'")
    embed_masks = masks_lib.prefix_masks(self.embed_widths)
    norms = [((ln, p), embed_masks) for ln in ("ln1", "ln2") for p in ("scale", "bias")]
    return (norms + prefixed(("attn",), self.attn.choice_masks("embed"))
            + prefixed(("mlp",), self.mlp.choice_masks("embed")))
