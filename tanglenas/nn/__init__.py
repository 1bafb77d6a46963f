"""Entangled layers: candidate choices as masks on one super-weight (`we`) or separate weights (`ws`)."""

from tanglenas.nn.arch import ArchParam, Decision, arch_logits, one_hot_mixture, sample_path, uniform_mixture
from tanglenas.nn.attention import EntangledAttention, EntangledMLP, TransformerBlock
from tanglenas.nn.conv import EntangledConv, conv2d, depthwise_conv
from tanglenas.nn.depth import mix_depths
from tanglenas.nn.linear import EntangledEmbed, EntangledLinear
from tanglenas.nn.norm import BatchNorm, LayerNorm, recalibrate_batch_norm
