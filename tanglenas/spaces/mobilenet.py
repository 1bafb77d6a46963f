"""Once-for-All's MobileNetV3 space (Cai et al., ICLR 2020), as TangleNAS searches it: "mobilenetv3".

A stem (3x3 conv, stride 2, h-swish), a fixed first block, five stages of inverted-residual (MBConv) blocks,
a 1x1 expansion, global pooling, a 1x1 feature mix and a linear classifier, with OFA's stage settings:
output widths 24/40/80/112/160 (times the width multiplier), strides 2/2/2/1/2, ReLU in the first two stages
and h-swish after, squeeze-excite in stages 2, 4 and 5. Searchable per block: depthwise kernel {3, 5, 7}
(the centred window of the 7x7 super-kernel) and expansion ratio {3, 4, 6} (a channel prefix of the expanded
width make_divisible(in * ratio, 8)); per stage: depth {2, 3, 4}, the blocks beyond it skipped.
That is (9^2 + 9^3 + 9^4)^5 ≈ 2.2e19 distinct networks, as OFA counts them. OFA transforms the cropped
kernels with learned matrices; here, as in TangleNAS, a smaller kernel is the plain centre crop.

`we`: each block is ONE MBConv on masked super-weights. `ws`: each block has nine separate MBConvs, one per
(kernel, ratio), summed with the product of the two mixtures' weights.

Genotype string: OFA's, `{"ks": [20 kernels], "e": [20 ratios], "d": [5 depths]}` (block j of stage s at
position 4s + j); blocks beyond their stage's depth are written with the smallest choice, and parsing
accepts any value there.
Presets: "paper" (OFA's released supernet: width multiplier 1.2, ImageNet 224x224, 1000 classes; on a CPU,
tanglenas.data's downsampled ImageNet with `image_size` 16, 32 or 64) and "tiny" (CIFAR-10 32x32, small widths;
tests and CPU runs).
"""

from __future__ import annotations

import ast
import functools
import itertools
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tanglenas.nn import masks as masks_lib
from tanglenas.nn.arch import Decision, check_mode, init_arch
from tanglenas.nn.conv import EntangledConv
from tanglenas.nn.depth import DepthGate, DepthGated, depth_use, mix_depths
from tanglenas.nn.linear import EntangledLinear, MaskList, choice_index, prefixed, whole_weight_masks
from tanglenas.nn.norm import BatchNorm
from tanglenas.spaces.base import ChoiceMask, Genotype, Space

KERNELS, EXPANDS, DEPTHS = (3, 5, 7), (3, 4, 6), (2, 3, 4)
STAGE_STRIDES = (2, 2, 2, 1, 2)
STAGE_ACTIVATIONS = ("relu", "relu", "h_swish", "h_swish", "h_swish")
STAGE_SE = (False, True, False, True, True)
ACTIVATIONS = {"relu": jax.nn.relu, "h_swish": jax.nn.hard_swish}
SE_REDUCTION = 4


def make_divisible(value: float, divisor: int = 8) -> int:
  """The nearest multiple of `divisor` (at least `divisor`), rounded up when rounding loses over 10%."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


class MBConvBlock(nnx.Module):
  """OFA's MBConv: 1x1 expansion (BN, act) -> depthwise k x k (BN, act) -> squeeze-excite -> 1x1 projection
  (BN); residual when the stride is 1 and the widths agree. A ratio of 1 has no expansion conv."""

  def __init__(self, c_in: int, c_out: int, *, kernel_sizes: Sequence[int], expand_ratios: Sequence[float],
               stride: int, activation: str, use_se: bool, mode: str = "we", impl: str = "auto",
               rngs: nnx.Rngs):
    self.kernel_sizes, self.expand_ratios = tuple(sorted(kernel_sizes)), tuple(sorted(expand_ratios))
    self.activation, self.use_se, self.mode = activation, use_se, check_mode(mode)
    self.residual = stride == 1 and c_in == c_out
    self.mids = tuple(make_divisible(round(c_in * e)) for e in self.expand_ratios)
    if self.mode == "ws":
      self.candidates = nnx.List([
          MBConvBlock(c_in, c_out, kernel_sizes=(k,), expand_ratios=(e,), stride=stride, activation=activation,
                      use_se=use_se, impl=impl, rngs=rngs)
          for k, e in itertools.product(self.kernel_sizes, self.expand_ratios)])
      return
    mid = self.mids[-1]
    has_expand = self.expand_ratios != (1,)
    self.expand = EntangledLinear(c_in, mid, out_widths=self.mids, use_bias=False, rngs=rngs) if has_expand else None
    self.expand_bn = BatchNorm(mid) if has_expand else None
    self.depthwise = EntangledConv(mid, mid, self.kernel_sizes, out_widths=self.mids, depthwise=True,
                                   stride=stride, impl=impl, rngs=rngs)
    self.depthwise_bn = BatchNorm(mid)
    if use_se:
      self.se_widths = tuple(make_divisible(m // SE_REDUCTION) for m in self.mids)
      self.se_reduce = EntangledLinear(mid, self.se_widths[-1], in_widths=self.mids, out_widths=self.se_widths,
                                       rngs=rngs)
      self.se_expand = EntangledLinear(self.se_widths[-1], mid, in_widths=self.se_widths, out_widths=self.mids,
                                       rngs=rngs)
    self.project = EntangledLinear(mid, c_out, in_widths=self.mids, use_bias=False, rngs=rngs)
    self.project_bn = BatchNorm(c_out)

  def __call__(self, x_NHWC: jax.Array, *, kernel: jax.Array | None = None,
               expand: jax.Array | None = None) -> jax.Array:
    """`kernel`, `expand`: mixture weights [K] over kernel sizes / expansion ratios; None = the largest."""
    if self.mode == "ws":
      y = self._mix_candidates(x_NHWC, kernel, expand)
    else:
      # The expanded channels beyond the chosen width leave each norm as act(bias), not zero; every layer
      # after it masks them out of its weights, which is exact and ~25% cheaper than masking activations.
      # Those channels (zeros before the norm) keep their running statistics.
      act = ACTIVATIONS[self.activation]
      chosen = None if expand is None else masks_lib.mix(expand, masks_lib.prefix_masks(self.mids)) > 0
      h = x_NHWC
      if self.expand is not None:
        h = act(self.expand_bn(self.expand(h, out=expand), active=chosen))
      h = act(self.depthwise_bn(self.depthwise(h, kernel=kernel, out=expand), active=chosen))
      if self.use_se:
        s = jax.nn.relu(self.se_reduce(jnp.mean(h, axis=(1, 2)), in_=expand, out=expand))
        s = jax.nn.hard_sigmoid(self.se_expand(s, in_=expand, out=expand))
        h = h * s[:, None, None, :]
      y = self.project_bn(self.project(h, in_=expand))
    return x_NHWC + y if self.residual and self.mode == "we" else y

  def _mix_candidates(self, x, kernel, expand):
    if kernel is None and expand is None:
      return self.candidates[-1](x)
    w_kernel = jax.nn.one_hot(len(self.kernel_sizes) - 1, len(self.kernel_sizes)) if kernel is None else kernel
    w_expand = jax.nn.one_hot(len(self.expand_ratios) - 1, len(self.expand_ratios)) if expand is None else expand
    pairs = itertools.product(range(len(self.kernel_sizes)), range(len(self.expand_ratios)))
    return sum(w_kernel[i] * w_expand[j] * c(x) for (i, j), c in zip(pairs, self.candidates))

  def extract(self, *, kernel: int | None = None, expand: int | None = None) -> MBConvBlock:
    ki, ei = choice_index(kernel, self.kernel_sizes), choice_index(expand, self.expand_ratios)
    if self.mode == "ws":
      return self.candidates[ki * len(self.expand_ratios) + ei].extract()
    new = nnx.eval_shape(lambda: self)  # an abstract copy of the structure, every part replaced below
    new.kernel_sizes, new.expand_ratios = (self.kernel_sizes[ki],), (self.expand_ratios[ei],)
    new.mids, mid = (self.mids[ei],), self.mids[ei]
    if self.expand is not None:
      new.expand, new.expand_bn = self.expand.extract(out=ei), self.expand_bn.extract(mid)
    new.depthwise, new.depthwise_bn = self.depthwise.extract(kernel=ki, out=ei), self.depthwise_bn.extract(mid)
    if self.use_se:
      new.se_widths = (self.se_widths[ei],)
      new.se_reduce = self.se_reduce.extract(out=ei, in_=ei)
      new.se_expand = self.se_expand.extract(out=ei, in_=ei)
    new.project, new.project_bn = self.project.extract(in_=ei), self.project_bn.extract()
    return new

  def choice_masks(self, decision: str) -> MaskList:
    """(path, masks [K, ...]) of the weights choice k of `decision` ("kernel" or "expand") uses."""
    if decision not in ("kernel", "expand"):
      raise ValueError(f"unknown MBConv decision {decision!r}; choose 'kernel' or 'expand'")
    if self.mode == "ws":
      sizes = (len(self.kernel_sizes), len(self.expand_ratios))
      result = []
      for (i, j), c in zip(itertools.product(*map(range, sizes)), self.candidates):
        used = np.eye(sizes[0])[i] if decision == "kernel" else np.eye(sizes[1])[j]
        result += prefixed(("candidates", i * sizes[1] + j), whole_weight_masks(c, used))
      return result
    if decision == "kernel":
      return [(("depthwise", "kernel"), masks_lib.kernel_masks(self.kernel_sizes)[..., None])]
    mids = masks_lib.prefix_masks(self.mids)
    result = [(("depthwise", "kernel"), mids[:, None, None, :])]
    norms = ("depthwise_bn",) if self.expand is None else ("expand_bn", "depthwise_bn")
    result += [((bn, p), mids) for bn in norms for p in ("scale", "bias")]
    if self.expand is not None:
      result += prefixed(("expand",), self.expand.choice_masks(out=mids))
    if self.use_se:
      se = masks_lib.prefix_masks(self.se_widths)
      result += prefixed(("se_reduce",), self.se_reduce.choice_masks(in_=mids, out=se))
      result += prefixed(("se_expand",), self.se_expand.choice_masks(in_=se, out=mids))
    return result + prefixed(("project",), self.project.choice_masks(in_=mids))


class MobileNetV3(nnx.Module):
  """The OFA MobileNetV3 supernet, or (after `extract`) the standalone network of one genotype."""

  def __init__(self, widths: Sequence[int], *, in_channels: int, num_classes: int, dropout: float,
               decisions: Sequence[Decision], mode: str, impl: str, rngs: nnx.Rngs):
    stem, first, *stage_widths, final, last = widths
    self.stem = EntangledConv(in_channels, stem, (3,), stride=2, impl=impl, rngs=rngs)
    self.stem_bn = BatchNorm(stem)
    self.first_block = MBConvBlock(stem, first, kernel_sizes=(3,), expand_ratios=(1,), stride=1,
                                   activation="relu", use_se=False, impl=impl, rngs=rngs)
    stages, c_in = [], first
    for c_out, stride, act, se in zip(stage_widths, STAGE_STRIDES, STAGE_ACTIVATIONS, STAGE_SE):
      stages.append(nnx.List([
          MBConvBlock(c_in if j == 0 else c_out, c_out, kernel_sizes=KERNELS, expand_ratios=EXPANDS,
                      stride=stride if j == 0 else 1, activation=act, use_se=se, mode=mode, impl=impl, rngs=rngs)
          for j in range(DEPTHS[-1])]))
      c_in = c_out
    self.stages = nnx.List(stages)
    self.stage_depths = (DEPTHS,) * len(stages)
    self.final_expand = EntangledLinear(c_in, final, use_bias=False, rngs=rngs)
    self.final_bn = BatchNorm(final)
    self.feature_mix = EntangledLinear(final, last, use_bias=False, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.classifier = EntangledLinear(last, num_classes, rngs=rngs)
    self.arch = init_arch(decisions)

  def __call__(self, x_NHWC: jax.Array, mixture=None, *, return_features: bool = False):
    choice = (lambda name: None) if mixture is None else mixture.__getitem__
    x = jax.nn.hard_swish(self.stem_bn(self.stem(x_NHWC)))
    x = self.first_block(x)
    for s, (stage, depths) in enumerate(zip(self.stages, self.stage_depths)):
      blocks = [functools.partial(block, kernel=choice(f"kernel_{s}_{j}"), expand=choice(f"expand_{s}_{j}"))
                for j, block in enumerate(stage)]
      x = mix_depths(blocks, x, depths, choice(f"depth_{s}"))
    x = jax.nn.hard_swish(self.final_bn(self.final_expand(x)))
    h = self.dropout(jax.nn.hard_swish(self.feature_mix(jnp.mean(x, axis=(1, 2)))))
    logits = self.classifier(h)
    return (logits, h) if return_features else logits

  def extract(self, kernels: Sequence[Sequence[int]], expands: Sequence[Sequence[int]],
              depths: Sequence[int]) -> MobileNetV3:
    """The standalone network of choice indices: per stage its depth and per kept block (kernel, ratio)."""
    new = nnx.eval_shape(lambda: self)  # an abstract copy of the structure, every part replaced below
    new.stem, new.stem_bn = self.stem.extract(), self.stem_bn.extract()
    new.first_block = self.first_block.extract()
    stages = []
    for s, stage in enumerate(self.stages):
      d = self.stage_depths[s][depths[s]]
      stages.append(nnx.List([stage[j].extract(kernel=kernels[s][j], expand=expands[s][j]) for j in range(d)]))
    new.stages = nnx.List(stages)
    new.stage_depths = tuple((self.stage_depths[s][depths[s]],) for s in range(len(stages)))
    new.final_expand, new.final_bn = self.final_expand.extract(), self.final_bn.extract()
    new.feature_mix, new.classifier = self.feature_mix.extract(), self.classifier.extract()
    new.dropout = nnx.Dropout(self.dropout.rate, rngs=nnx.Rngs(0))
    new.arch = nnx.Dict({})
    return new


PRESETS = {
    # Base widths (OFA's): stem, first block, five stages, final expansion, feature mix; then x width_mult.
    "paper": dict(widths=(16, 16, 24, 40, 80, 112, 160, 960, 1280), width_mult=1.2, image_size=224,
                  num_classes=1000, dataset="imagenet"),
    "tiny": dict(widths=(8, 8, 8, 16, 16, 24, 32, 64, 96), width_mult=1.0, image_size=32, num_classes=10,
                 dataset="cifar10"),
}


class MobileNetV3Space(DepthGated, Space):
  """OFA's MobileNetV3 space. Options: `preset` ("paper" | "tiny"); `image_size`, `num_classes` (None: the
  preset's); `dropout` before the classifier; `impl`, the depthwise-conv formulation (tanglenas.nn.conv)."""

  name = "mobilenetv3"
  outside_cells = ("stem", "stem_bn", "first_block", "final_expand", "final_bn", "feature_mix", "classifier")

  def __init__(self, preset: str = "paper", *, image_size: int | None = None, num_classes: int | None = None,
               dropout: float = 0.1, impl: str = "auto"):
    if preset not in PRESETS:
      raise ValueError(f"unknown mobilenetv3 preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    self.preset, self.dropout, self.impl, self.dataset = preset, dropout, impl, p["dataset"]
    self.widths = tuple(make_divisible(w * p["width_mult"]) for w in p["widths"])
    size = p["image_size"] if image_size is None else image_size
    self.input_shape = (size, size, 3)
    self.num_classes = p["num_classes"] if num_classes is None else num_classes
    stages, blocks = range(len(STAGE_STRIDES)), range(DEPTHS[-1])
    self.decisions = (*(Decision(f"kernel_{s}_{j}", KERNELS) for s in stages for j in blocks),
                      *(Decision(f"expand_{s}_{j}", EXPANDS) for s in stages for j in blocks),
                      *(Decision(f"depth_{s}", DEPTHS) for s in stages))
    self.gates = {f"{kind}_{s}_{j}": DepthGate(f"depth_{s}", j)
                  for kind in ("kernel", "expand") for s in stages for j in blocks}

  def supernet(self, *, mode: str = "we", rngs: nnx.Rngs) -> MobileNetV3:
    return MobileNetV3(self.widths, in_channels=self.input_shape[-1], num_classes=self.num_classes,
                       dropout=self.dropout, decisions=self.decisions, mode=check_mode(mode), impl=self.impl,
                       rngs=rngs)

  def standalone(self, supernet: MobileNetV3, genotype: Genotype) -> MobileNetV3:
    chosen, stages, blocks = self.index_map(genotype), range(len(STAGE_STRIDES)), range(DEPTHS[-1])
    return supernet.extract([[chosen[f"kernel_{s}_{j}"] for j in blocks] for s in stages],
                            [[chosen[f"expand_{s}_{j}"] for j in blocks] for s in stages],
                            [chosen[f"depth_{s}"] for s in stages])

  def choice_masks(self, supernet: MobileNetV3) -> list[ChoiceMask]:
    result = []
    for s, stage in enumerate(supernet.stages):
      for j, block in enumerate(stage):
        path = ("stages", s, j)
        for kind in ("kernel", "expand"):
          result += [ChoiceMask(f"{kind}_{s}_{j}", path + p, m) for p, m in block.choice_masks(kind)]
        used = depth_use(DEPTHS, j)
        if not used.all():
          result += [ChoiceMask(f"depth_{s}", path + p, m) for p, m in whole_weight_masks(block, used)]
    return result

  # --- genotype strings, OFA's format ------------------------------------------------------------------
  def format(self, indices: Sequence[int]) -> str:
    chosen = dict(zip((d.name for d in self.decisions), indices))
    stages, blocks = range(len(STAGE_STRIDES)), range(DEPTHS[-1])
    return json.dumps({"ks": [KERNELS[chosen[f"kernel_{s}_{j}"]] for s in stages for j in blocks],
                       "e": [EXPANDS[chosen[f"expand_{s}_{j}"]] for s in stages for j in blocks],
                       "d": [DEPTHS[chosen[f"depth_{s}"]] for s in stages]})

  def parse(self, text: str) -> Genotype:
    try:
      arch = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      arch = None
    n_stages, n_blocks = len(STAGE_STRIDES), len(STAGE_STRIDES) * DEPTHS[-1]
    lengths = {"ks": n_blocks, "e": n_blocks, "d": n_stages}
    if not isinstance(arch, dict) or sorted(arch) != sorted(lengths) or any(
        not isinstance(arch[k], list) or len(arch[k]) != n for k, n in lengths.items()):
      raise ValueError(f"{self.name}: not an OFA genotype string {{'ks': [{n_blocks} kernels], 'e': "
                       f"[{n_blocks} ratios], 'd': [{n_stages} depths]}}: {text[:80]!r}")
    indices = {}
    for key, kind, choices in (("d", "depth", DEPTHS), ("ks", "kernel", KERNELS), ("e", "expand", EXPANDS)):
      for position, value in enumerate(arch[key]):
        stage, block = divmod(position, DEPTHS[-1])
        name = f"depth_{position}" if kind == "depth" else f"{kind}_{stage}_{block}"
        active = kind == "depth" or block < DEPTHS[indices[f"depth_{stage}"]]
        if value in choices and not isinstance(value, bool):
          indices[name] = choices.index(value)
        elif active:
          raise ValueError(f"{self.name}: {key}[{position}] = {value!r} is not one of {choices}")
        else:  # a block beyond its stage's depth: any value
          indices[name] = 0
    return self.genotype(indices)
