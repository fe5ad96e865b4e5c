"""The released JanusFlow-1.3B (deepseek-ai/JanusFlow-1.3B) with the SDXL VAE.

LLM: DeepSeek-LLM 1.3B, 24 layers x 2048 wide, 16 heads of 128, SwiGLU 5632, vocab 102400, RMSNorm
eps 1e-6, RoPE theta 1e4. SigLIP-L/16 at 384 px (24 blocks, 1024 wide). g_enc/g_dec: ShallowUViT,
768 channels, 2 ConvNeXt blocks each, patch 2. VAE: SDXL (scaling 0.13025). 384 px <-> 48x48x4
latents <-> 576 image tokens. Values and their sources: shared/reference/JANUSFLOW.md and the
dataclass defaults in jfl/models/config.py (the single place they are written).

  jfl-convert --model-dir JanusFlow-1.3B --vae-dir sdxl-vae --out ckpt/janusflow_1_3b
  python -c "from configs import janusflow_1_3b; print(janusflow_1_3b.get_config())"
"""

import ml_collections

from jfl.models.config import JanusFlowConfig


def model_config(arch: JanusFlowConfig = JanusFlowConfig()) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(arch.to_dict())


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.model = model_config()
  config.compute_dtype = "bfloat16"  # activations; parameters are always float32
  return config
