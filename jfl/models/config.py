"""Architecture configs: frozen dataclasses whose defaults are the released JanusFlow-1.3B.

The training/launch `ConfigDict`s in `configs/` carry these same fields under `config.model`
(see `configs/janusflow_1_3b.py`); `JanusFlowConfig.from_dict` turns such a dict back into
dataclasses and rejects unknown fields by name.
"""

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """DeepSeek-LLM 1.3B (HF LLaMA architecture)."""
  vocab_size: int = 102400
  hidden_size: int = 2048
  intermediate_size: int = 5632
  num_layers: int = 24
  num_heads: int = 16
  num_kv_heads: int = 16
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  max_position_embeddings: int = 16384


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  """SigLIP-L/16-384 understanding encoder (timm layout, no class token, no pooling head)."""
  image_size: int = 384
  patch_size: int = 16
  width: int = 1024
  depth: int = 24            # blocks in the pretrained tower
  num_heads: int = 16
  mlp_dim: int = 4096
  layer_norm_eps: float = 1e-6
  select_layer: int = -1     # <= 0 truncates the tower at build time: depth + select_layer + 1 blocks

  @property
  def num_blocks(self) -> int:
    return min(self.depth, self.depth + self.select_layer + 1) if self.select_layer <= 0 else min(self.depth, self.select_layer)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class GenHeadsConfig:
  """ShallowUViT generation encoder (g_enc) and decoder (g_dec) around the LLM."""
  latent_channels: int = 4   # VAE latent channels in and velocity channels out
  channels: int = 768        # g_enc width (block_out_channels[0]); g_dec runs at 2x after the skip concat
  patch_size: int = 2        # in_conv kernel/stride and the decoder's pixel-shuffle factor
  num_blocks: int = 2        # ConvNeXt blocks in each mid block (layers_in_middle)
  ffn_factor: int = 4
  norm_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class RepaConfig:
  """REPA projector h_phi: MLP from the LLM width to the SigLIP width (not in the release)."""
  hidden_dims: tuple[int, ...] = (2048, 2048)
  activation: str = "silu"
  layer: int = 6             # align the output of this many LLM blocks (1-based count)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """SDXL-VAE (diffusers AutoencoderKL)."""
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  scaling_factor: float = 0.13025
  mid_block_attention: bool = True
  space_to_depth: int = 0    # > 0: no autoencoder, a fixed pixel codec folding f x f pixels into channels

  def __post_init__(self):
    if self.space_to_depth and self.latent_channels != self.in_channels * self.space_to_depth ** 2:
      raise ValueError(f"vae.space_to_depth={self.space_to_depth} needs latent_channels="
                       f"{self.in_channels * self.space_to_depth ** 2}, got {self.latent_channels}")

  @property
  def downsample(self) -> int:
    return self.space_to_depth or 2 ** (len(self.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class JanusFlowConfig:
  """The whole model. Image tokens: (image_size / vae.downsample / gen.patch_size)^2 = 576."""
  llm: LlamaConfig = LlamaConfig()
  siglip: SiglipConfig = SiglipConfig()
  gen: GenHeadsConfig = GenHeadsConfig()
  repa: RepaConfig = RepaConfig()
  vae: VAEConfig = VAEConfig()
  image_size: int = 384

  def __post_init__(self):
    if self.siglip.image_size != self.image_size or self.siglip.grid != self.gen_grid:
      raise ValueError(
          f"SigLIP sees {self.siglip.image_size}px as a {self.siglip.grid}x{self.siglip.grid} grid but "
          f"generation uses {self.image_size}px as a {self.gen_grid}x{self.gen_grid} grid; REPA aligns "
          "them token by token, so both must match")

  @property
  def latent_size(self) -> int:
    return self.image_size // self.vae.downsample

  @property
  def gen_grid(self) -> int:
    return self.latent_size // self.gen.patch_size

  @property
  def num_image_tokens(self) -> int:
    return self.gen_grid ** 2

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "JanusFlowConfig":
    return _from_dict(cls, d, "model")

  @classmethod
  def tiny(cls) -> "JanusFlowConfig":
    """A few-layer model with the released structure; runs in seconds on CPU."""
    return cls(
        llm=LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=512),
        siglip=SiglipConfig(image_size=32, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64),
        gen=GenHeadsConfig(channels=16),
        repa=RepaConfig(hidden_dims=(64, 64), layer=1),
        vae=VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4),
        image_size=32,
    )


def _from_dict(cls, d, where):
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ValueError(f"unknown config field(s) {', '.join(where + '.' + k for k in unknown)}; "
                     f"known: {', '.join(sorted(fields))}")
  kwargs = {}
  for name, value in d.items():
    ftype = fields[name].default
    if dataclasses.is_dataclass(ftype):
      value = _from_dict(type(ftype), dict(value), f"{where}.{name}")
    elif isinstance(ftype, tuple):
      value = tuple(value)
    kwargs[name] = value
  return cls(**kwargs)
