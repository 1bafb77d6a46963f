"""The NAS-Bench-201 cell space (Dong & Yang, ICLR 2020) on CIFAR-10: 5^6 = 15625 architectures.

A cell has 4 nodes; node j sums an operation on every earlier node (6 edges). Each edge chooses one of none,
skip_connect, nor_conv_1x1, nor_conv_3x3 (ReLU-Conv-BN, affine batch norm) and avg_pool_3x3 (stride 1,
padding 1, padding excluded from the average). All cells share the same 6 decisions. The macro skeleton:
stem 3x3 conv + BN; N cells at C channels, a residual reduction block, N cells at 2C, another block, N cells
at 4C; BN, ReLU, global average pooling, linear.

`we` (TangleNAS): nor_conv_1x1 is the centre of nor_conv_3x3, so both are ONE ReLU-Conv-BN on a 3x3
super-kernel. A batch norm normalizes away any scale of its input, so a family weight applied to the kernel
(as TangleNAS's code does) cancels in training and the convolutions' total weight gets no gradient; worse,
with an affine BN a family of weight 0 still outputs the BN's bias. Hence the family runs with its kernel
mixture normalized within the family, w1/s * M1 + w3/s * M3, and its OUTPUT is scaled by its total weight
s = w1 + w3:
    edge(x) = w_skip * x + w_pool * avg_pool(x) + s * ReLUConvBN(x; kernel mixture / s)
A one-hot mixture thus gives exactly the chosen operation (s is 0 or 1), and s is learned like the other
operations' weights.
`ws` (DARTS): one ReLU-Conv-BN per convolution; all outputs summed with the mixture weights.
Genotype strings are NAS-Bench-201's, e.g. `|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|...~2|`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tanglenas.nn import masks as masks_lib
from tanglenas.nn.arch import Decision, check_mode, init_arch
from tanglenas.nn.conv import EntangledConv
from tanglenas.nn.norm import BatchNorm
from tanglenas.spaces.base import ChoiceMask, Genotype, Space, copy_module
from tanglenas.spaces.toy_cell import FixedEdge

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
EDGES = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))  # (node, input node), in NAS-Bench-201's string order
_CONV_KERNELS = {"nor_conv_1x1": 1, "nor_conv_3x3": 3}
# |op~0|+|op~0|op~1|+|op~0|op~1|op~2|, one group per edge in EDGES order
_STRING = re.compile(r"\+".join("".join(rf"\|(\w+)~{j}" for i, j in EDGES if i == node) + r"\|"
                                for node in range(1, 4)))


def pool_3x3(x_NHWC: jax.Array, kind: str, stride: int = 1) -> jax.Array:
  """3x3 pooling with padding 1; the average leaves the padding out (PyTorch's count_include_pad=False)."""
  padding = ((1, 1), (1, 1))
  if kind == "max":
    return nnx.max_pool(x_NHWC, (3, 3), (stride, stride), padding)
  return nnx.avg_pool(x_NHWC, (3, 3), (stride, stride), padding, count_include_pad=False)


class Zero(nnx.Module):
  """The `none` operation: zeros at the output's resolution.

  x * 0 (NAS-Bench-201's and DARTS's `x.mul(0.)`), not a constant: behind a node whose edges are all `none`, a
  pooling of a constant is constant-folded by XLA while compiling, slowly ("Constant folding ... > 1s" errors).
  """

  def __init__(self, stride: int = 1):
    self.stride = stride

  def __call__(self, x):
    return x[:, ::self.stride, ::self.stride] * 0.0


class Identity(nnx.Module):

  def __call__(self, x):
    return x


class Pool(nnx.Module):
  """A parameter-free 3x3 pooling operation ("max" or "avg")."""

  def __init__(self, kind: str, stride: int = 1):
    self.kind, self.stride = kind, stride

  def __call__(self, x):
    return pool_3x3(x, self.kind, self.stride)


class ReLUConvBN(nnx.Module):
  """ReLU, convolution without bias, batch norm; `kernel_sizes` entangled in one super-kernel."""

  def __init__(self, c_in: int, c_out: int, kernel_sizes: Sequence[int] = (1,), stride: int = 1, *,
               affine: bool = True, impl: str = "auto", rngs: nnx.Rngs):
    self.conv = EntangledConv(c_in, c_out, kernel_sizes, stride=stride, impl=impl, rngs=rngs)
    self.bn = BatchNorm(c_out, affine=affine)

  def __call__(self, x, kernel=None, active=None):
    return self.bn(self.conv(jax.nn.relu(x), kernel=kernel), active=active)

  def extract(self, kernel_index: int | None = None) -> ReLUConvBN:
    new = nnx.eval_shape(lambda: self)  # an abstract copy of the structure, filled below
    new.conv, new.bn = self.conv.extract(kernel=kernel_index), self.bn.extract()
    return new

  def choice_masks(self, path: tuple, decision: str, masks_K: np.ndarray) -> list[ChoiceMask]:
    """Masks of its weights: the kernel's `masks_K` ([K, k, k]) and, per choice, the BN's affine parameters."""
    result = [ChoiceMask(decision, path + ("conv", "kernel"), masks_K[..., None, None])]
    if self.bn.scale is not None:
      uses = masks_K.reshape(len(masks_K), -1).max(axis=1)[:, None]
      result += [ChoiceMask(decision, path + ("bn", name), uses) for name in ("scale", "bias")]
    return result


class EntangledEdge(nnx.Module):
  """`we` edge: none, skip and pool are parameter-free; both convolutions are one ReLU-Conv-BN (see above)."""

  def __init__(self, c: int, *, impl: str, rngs: nnx.Rngs):
    self.conv = ReLUConvBN(c, c, (1, 3), impl=impl, rngs=rngs)

  def __call__(self, x, weights):
    total = weights[2] + weights[3]
    active = total > 0  # else the conv runs on a zero kernel: its batch norm keeps its statistics
    convs = total * self.conv(x, kernel=weights[2:4] / jnp.where(active, total, 1.0), active=active)
    return weights[1] * x + convs + weights[4] * pool_3x3(x, "avg")

  def extract(self, op_index: int) -> nnx.Module:
    op = OPS[op_index]
    if op in _CONV_KERNELS:
      return self.conv.extract((1, 3).index(_CONV_KERNELS[op]))
    return _parameter_free(op)

  def choice_masks(self, path: tuple, decision: str) -> list[ChoiceMask]:
    masks = np.zeros((len(OPS), 3, 3), np.float32)
    masks[2:4] = masks_lib.kernel_masks((1, 3))
    return self.conv.choice_masks(path + ("conv",), decision, masks)


class SharedEdge(nnx.Module):
  """`ws` edge: a separate ReLU-Conv-BN per convolution; all outputs summed with the mixture weights."""

  def __init__(self, c: int, *, impl: str, rngs: nnx.Rngs):
    self.convs = nnx.List([ReLUConvBN(c, c, (k,), impl=impl, rngs=rngs) for k in _CONV_KERNELS.values()])

  def __call__(self, x, weights):
    convs = weights[2] * self.convs[0](x) + weights[3] * self.convs[1](x)
    return weights[1] * x + convs + weights[4] * pool_3x3(x, "avg")

  def extract(self, op_index: int) -> nnx.Module:
    op = OPS[op_index]
    if op in _CONV_KERNELS:
      return self.convs[list(_CONV_KERNELS).index(op)].extract()
    return _parameter_free(op)

  def choice_masks(self, path: tuple, decision: str) -> list[ChoiceMask]:
    result = []
    for i, conv in enumerate(self.convs):
      k = conv.conv.kernel_sizes[0]
      masks = np.zeros((len(OPS), k, k), np.float32)
      masks[2 + i] = 1.0
      result += conv.choice_masks(path + ("convs", i), decision, masks)
    return result


def _parameter_free(op: str) -> nnx.Module:
  return {"none": Zero, "skip_connect": Identity, "avg_pool_3x3": lambda: Pool("avg")}[op]()


class Cell(nnx.Module):
  """Node j = sum of its edges' operations on the earlier nodes; the output is the last node."""

  def __init__(self, edges: Sequence[nnx.Module]):
    self.edges = nnx.List(list(edges))

  def __call__(self, x, weights_EK=None):
    w = [None] * len(EDGES) if weights_EK is None else weights_EK
    nodes = [x]
    for node in range(1, 4):
      nodes.append(sum(self.edges[e](nodes[j], w[e]) for e, (i, j) in enumerate(EDGES) if i == node))
    return nodes[-1]


class ResidualBlock(nnx.Module):
  """NAS-Bench-201's ResNetBasicblock with stride 2: two ReLU-Conv-BNs; shortcut 2x2 average pool + 1x1 conv."""

  def __init__(self, c_in: int, c_out: int, *, impl: str, rngs: nnx.Rngs):
    self.conv_a = ReLUConvBN(c_in, c_out, (3,), stride=2, impl=impl, rngs=rngs)
    self.conv_b = ReLUConvBN(c_out, c_out, (3,), impl=impl, rngs=rngs)
    self.shortcut = EntangledConv(c_in, c_out, (1,), impl=impl, rngs=rngs)

  def __call__(self, x):
    residual = self.shortcut(nnx.avg_pool(x, (2, 2), (2, 2)))
    return residual + self.conv_b(self.conv_a(x))


class NB201Network(nnx.Module):
  """The supernet (cells of mixed edges) or a standalone network (cells of `FixedEdge`s)."""

  def __init__(self, layers: Sequence[nnx.Module], decisions: Sequence[Decision], *, channels: int,
               num_classes: int, impl: str, rngs: nnx.Rngs):
    self.stem = EntangledConv(3, channels, (3,), impl=impl, rngs=rngs)
    self.stem_bn = BatchNorm(channels)
    self.layers = nnx.List(list(layers))
    self.arch = init_arch(decisions)
    self.last_bn = BatchNorm(4 * channels)
    self.classifier = nnx.Linear(4 * channels, num_classes, rngs=rngs)

  def __call__(self, x_NHWC, mixture=None, *, return_features: bool = False):
    weights = None if mixture is None else [mixture[_edge_name(*edge)] for edge in EDGES]
    x = self.stem_bn(self.stem(x_NHWC))
    for layer in self.layers:
      x = layer(x, weights) if isinstance(layer, Cell) else layer(x)
    h = jnp.mean(jax.nn.relu(self.last_bn(x)), axis=(1, 2))
    logits = self.classifier(h)
    return (logits, h) if return_features else logits


def _edge_name(node: int, input_node: int) -> str:
  return f"edge_{node}_{input_node}"


class NB201Space(Space):
  """NAS-Bench-201's topology space. `channels` = C (16 in the benchmark), `cells` = N per stage (5)."""

  name = "nb201"
  num_classes = 10
  dataset = "cifar10"

  def __init__(self, channels: int = 16, cells: int = 5, *, impl: str = "auto",
               input_shape: tuple[int, int, int] = (32, 32, 3)):
    if channels < 1 or cells < 1:
      raise ValueError(f"nb201 needs channels >= 1 and cells >= 1, got channels={channels}, cells={cells}")
    self.channels, self.cells, self.impl = channels, cells, impl
    self.input_shape = tuple(input_shape)
    self.decisions = tuple(Decision(_edge_name(*edge), OPS) for edge in EDGES)

  def supernet(self, *, mode: str = "we", rngs: nnx.Rngs) -> NB201Network:
    check_mode(mode)
    edge_type = EntangledEdge if mode == "we" else SharedEdge
    layers = []
    for stage in range(3):
      c = self.channels * 2 ** stage
      if stage:
        layers.append(ResidualBlock(c // 2, c, impl=self.impl, rngs=rngs))
      layers += [Cell([edge_type(c, impl=self.impl, rngs=rngs) for _ in EDGES]) for _ in range(self.cells)]
    return NB201Network(layers, self.decisions, channels=self.channels, num_classes=self.num_classes,
                        impl=self.impl, rngs=rngs)

  def standalone(self, supernet: NB201Network, genotype: Genotype) -> NB201Network:
    ops = genotype.indices  # one per edge, in EDGES order
    layers = []
    for layer in supernet.layers:
      if isinstance(layer, Cell):
        layers.append(Cell([FixedEdge(edge.extract(op)) for edge, op in zip(layer.edges, ops)]))
      else:
        layers.append(copy_module(layer))
    net = nnx.eval_shape(lambda: supernet)
    net.stem, net.stem_bn = supernet.stem.extract(), supernet.stem_bn.extract()
    net.layers, net.arch = nnx.List(layers), nnx.Dict({})
    net.last_bn, net.classifier = supernet.last_bn.extract(), copy_module(supernet.classifier)
    return net

  def choice_masks(self, supernet: NB201Network) -> list[ChoiceMask]:
    result = []
    for l, layer in enumerate(supernet.layers):
      if isinstance(layer, Cell):
        for e, edge in enumerate(layer.edges):
          result += edge.choice_masks(("layers", l, "edges", e), _edge_name(*EDGES[e]))
    return result

  # --- genotype strings, exactly as NAS-Bench-201 writes them --------------------------------------------
  def format(self, indices: Sequence[int]) -> str:
    nodes = []
    for node in range(1, 4):
      nodes.append("|" + "|".join(f"{OPS[indices[e]]}~{j}" for e, (i, j) in enumerate(EDGES) if i == node) + "|")
    return "+".join(nodes)

  def parse(self, text: str) -> Genotype:
    match = _STRING.fullmatch(text.strip())
    if not match or any(op not in OPS for op in match.groups()):
      raise ValueError(f"{self.name}: not a NAS-Bench-201 string '|op~0|+|op~0|op~1|+|op~0|op~1|op~2|' with ops "
                       f"from {OPS}: {text[:100]!r}")
    return self.genotype([OPS.index(op) for op in match.groups()])

