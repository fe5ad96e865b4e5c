"""Reading and writing HuggingFace-layout JanusFlow and diffusers-layout VAE directories.

JanusFlow: `config.json` (`model_type: multi_modality`) plus one of `model.safetensors`,
sharded `model-*.safetensors` + `model.safetensors.index.json`, or `pytorch_model.bin`.
VAE: `config.json` (AutoencoderKL) plus `diffusion_pytorch_model.safetensors`.

Checkpoint tensors are read as numpy (bf16 via ml_dtypes) and converted to float32 params.
Every expected mistake raises `CheckpointError` with a one-line message naming the path/key.
"""

import json
import os
from typing import Callable

import numpy as np
import safetensors
import safetensors.numpy

from jfl.convert import mapping
from jfl.models.config import GenHeadsConfig, JanusFlowConfig, LlamaConfig, SiglipConfig, VAEConfig


class CheckpointError(ValueError):
  """A checkpoint directory or file is missing, malformed or does not match the model."""


# Named SigLIP variants of the reference's `create_siglip_vit` that JanusFlow models use.
SIGLIP_VARIANTS = {
    "siglip_large_patch16_384": dict(image_size=384, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4),
    "siglip_large_patch16_256": dict(image_size=256, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4),
}
# jfl extension: these keys in `vision_und_enc_config.params` override the named variant
# (tiny test models use them; the released config has none).
SIGLIP_OVERRIDES = ("patch_size", "width", "layers", "heads", "mlp_ratio")


# ----------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------

def read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      return {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises several exception types for corrupt files
    raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(f"{path}: reading .bin checkpoints needs torch (pip install torch==2.13.0); "
                          "safetensors checkpoints do not") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise CheckpointError(f"{path}: cannot load PyTorch checkpoint ({e})") from None
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def require_dir(path: str) -> None:
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory")


def read_state_dict(model_dir: str, weights_name: str = "model") -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory (single, sharded or .bin) as numpy arrays."""
  require_dir(model_dir)
  single = os.path.join(model_dir, f"{weights_name}.safetensors")
  index = os.path.join(model_dir, f"{weights_name}.safetensors.index.json")
  binary = os.path.join(model_dir, "pytorch_model.bin")
  if os.path.isfile(single):
    return read_safetensors(single)
  if os.path.isfile(index):
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: no 'weight_map'")
    state = {}
    for shard in sorted(set(weight_map.values())):
      state.update(read_safetensors(os.path.join(model_dir, shard)))
    missing = sorted(set(weight_map) - set(state))
    if missing:
      raise CheckpointError(f"{index}: tensor {missing[0]} is listed but absent from its shard")
    return state
  if os.path.isfile(binary):
    return read_torch_bin(binary)
  raise CheckpointError(f"{model_dir}: no {weights_name}.safetensors, sharded index or pytorch_model.bin")


def write_safetensors(state: dict[str, np.ndarray], path: str, dtype=None) -> None:
  if dtype is not None:
    state = {k: v.astype(dtype) for k, v in state.items()}
  safetensors.numpy.save_file(state, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------------------------

def _require(d, key, where):
  if key not in d:
    raise CheckpointError(f"{where}: missing field '{key}'")
  return d[key]


def config_from_hf(hf: dict, vae: VAEConfig = VAEConfig(), where: str = "config.json") -> JanusFlowConfig:
  """The jfl config of a reference `MultiModalityConfig` dict."""
  lang = _require(hf, "language_config", where)
  for key, ok in (("hidden_act", "silu"), ("tie_word_embeddings", False), ("rope_scaling", None),
                  ("attention_bias", False), ("mlp_bias", False)):
    if lang.get(key, ok) != ok:
      raise CheckpointError(f"{where}: language_config.{key}={lang[key]!r} is not supported (need {ok!r})")
  heads = _require(lang, "num_attention_heads", where)
  llm = LlamaConfig(
      vocab_size=_require(lang, "vocab_size", where),
      hidden_size=_require(lang, "hidden_size", where),
      intermediate_size=_require(lang, "intermediate_size", where),
      num_layers=_require(lang, "num_hidden_layers", where),
      num_heads=heads,
      num_kv_heads=lang.get("num_key_value_heads") or heads,
      head_dim=lang.get("head_dim") or lang["hidden_size"] // heads,
      rms_norm_eps=lang.get("rms_norm_eps", 1e-6),
      rope_theta=lang.get("rope_theta", 10000.0),
      max_position_embeddings=lang.get("max_position_embeddings", 2048),
  )
  und = _require(_require(hf, "vision_und_enc_config", where), "params", where)
  name = und.get("model_name", "siglip_large_patch16_384")
  if name not in SIGLIP_VARIANTS:
    raise CheckpointError(f"{where}: unknown SigLIP variant {name!r} (known: {', '.join(SIGLIP_VARIANTS)})")
  v = {**SIGLIP_VARIANTS[name], **{k: und[k] for k in SIGLIP_OVERRIDES if k in und}}
  image_size = und.get("image_size", v["image_size"])
  siglip = SiglipConfig(image_size=image_size, patch_size=v["patch_size"], width=v["width"], depth=v["layers"],
                        num_heads=v["heads"], mlp_dim=int(v["width"] * v["mlp_ratio"]),
                        select_layer=und.get("select_layer", -1))
  enc = _require(_require(hf, "vision_gen_enc_config", where), "params", where)
  dec = _require(_require(hf, "vision_gen_dec_config", where), "params", where)
  if enc.get("kernel_size") != enc.get("stride") or enc.get("padding", 0) not in (0, None):
    raise CheckpointError(f"{where}: vision_gen_enc_config needs kernel_size == stride and padding 0")
  if dec.get("upsamples", 1) != 1:
    raise CheckpointError(f"{where}: vision_gen_dec_config.upsamples={dec['upsamples']} is not supported (need 1)")
  gen = GenHeadsConfig(
      latent_channels=enc.get("input_channels", 4),
      channels=_require(enc, "block_out_channels", where)[0],
      patch_size=enc["kernel_size"],
      num_blocks=enc.get("layers_in_middle", 2),
      norm_eps=enc.get("norm_eps", 1e-6),
  )
  if dec.get("layers_in_middle", gen.num_blocks) != gen.num_blocks or dec.get("out_channels") != gen.latent_channels:
    raise CheckpointError(f"{where}: vision_gen_dec_config does not mirror vision_gen_enc_config")
  return JanusFlowConfig(llm=llm, siglip=siglip, gen=gen, vae=vae, image_size=image_size)


def config_to_hf(cfg: JanusFlowConfig) -> dict:
  """A reference-loadable `config.json` dict for `cfg` (inverse of `config_from_hf`)."""
  l, s, g = cfg.llm, cfg.siglip, cfg.gen
  d = l.hidden_size
  gen_common = dict(hidden_size=d, layers_in_middle=g.num_blocks, norm_eps=g.norm_eps, use_bias=True,
                    use_mid_block=True, block_out_channels=[g.channels])
  siglip = dict(image_size=s.image_size, model_name="siglip_large_patch16_384", select_feature="same",
                select_layer=s.select_layer)
  if SIGLIP_VARIANTS["siglip_large_patch16_384"] != dict(image_size=s.image_size, patch_size=s.patch_size,
                                                         width=s.width, layers=s.depth, heads=s.num_heads,
                                                         mlp_ratio=s.mlp_dim // s.width):
    siglip.update(patch_size=s.patch_size, width=s.width, layers=s.depth, heads=s.num_heads,
                  mlp_ratio=s.mlp_dim / s.width)
  return {
      "model_type": "multi_modality",
      "torch_dtype": "bfloat16",
      "language_config": dict(
          model_type="llama", vocab_size=l.vocab_size, hidden_size=d, intermediate_size=l.intermediate_size,
          num_hidden_layers=l.num_layers, num_attention_heads=l.num_heads, num_key_value_heads=l.num_kv_heads,
          head_dim=l.head_dim, rms_norm_eps=l.rms_norm_eps, rope_theta=l.rope_theta,
          max_position_embeddings=l.max_position_embeddings, torch_dtype="bfloat16"),
      "vision_und_enc_config": dict(cls="CLIPVisionTower", model_type="vision_und_enc", params=siglip),
      "vision_gen_enc_config": dict(cls="ShallowUViTEncoder", model_type="vision_gen_enc", params=dict(
          **gen_common, input_channels=g.latent_channels, kernel_size=g.patch_size, stride=g.patch_size,
          padding=0)),
      "vision_gen_dec_config": dict(cls="ShallowUViTDecoder", model_type="vision_gen_dec", params=dict(
          **gen_common, in_channels=g.channels, out_channels=g.latent_channels, upsamples=1)),
  }


def vae_config_from_diffusers(d: dict, where: str = "config.json") -> VAEConfig:
  if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
    raise CheckpointError(f"{where}: _class_name={d['_class_name']!r}, expected AutoencoderKL")
  return VAEConfig(
      in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
      latent_channels=d.get("latent_channels", 4),
      block_out_channels=tuple(_require(d, "block_out_channels", where)),
      layers_per_block=d.get("layers_per_block", 2), norm_num_groups=d.get("norm_num_groups", 32),
      scaling_factor=d.get("scaling_factor", 0.18215),
      mid_block_attention=d.get("mid_block_add_attention", True),
  )


def vae_config_to_diffusers(cfg: VAEConfig) -> dict:
  n = len(cfg.block_out_channels)
  return {
      "_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": cfg.in_channels,
      "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
      "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
      "norm_num_groups": cfg.norm_num_groups, "scaling_factor": cfg.scaling_factor,
      "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
      "mid_block_add_attention": cfg.mid_block_attention, "sample_size": 1024,
  }


# ----------------------------------------------------------------------------------------------
# Whole directories.
# ----------------------------------------------------------------------------------------------

def _convert(state, rules, abstract_params, ignored, where, progress):
  try:
    return mapping.to_flax(state, rules, mapping.shapes_of(abstract_params), ignored, progress)
  except mapping.ConversionError as e:
    raise CheckpointError(f"{where}: {e}") from None


def _cast_f32(tree):
  return {k: _cast_f32(v) if isinstance(v, dict) else np.asarray(v, np.float32) for k, v in tree.items()}


def load_janusflow(model_dir: str, vae: VAEConfig = VAEConfig(),
                   progress: Callable[[], None] | None = None) -> tuple[JanusFlowConfig, dict]:
  """(config, float32 params) of a HF-layout JanusFlow directory; strict (see mapping.to_flax)."""
  from jfl.models import janusflow  # pylint: disable=g-import-not-at-top
  require_dir(model_dir)
  config_path = os.path.join(model_dir, "config.json")
  cfg = config_from_hf(read_json(config_path), vae, config_path)
  state = read_state_dict(model_dir)
  params = _convert(state, mapping.janusflow_rules(cfg), janusflow.abstract_params(cfg),
                    mapping.IGNORED_SOURCES, model_dir, progress)
  return cfg, _cast_f32(params)


def load_vae(vae_dir: str, progress: Callable[[], None] | None = None) -> tuple[VAEConfig, dict]:
  """(config, float32 params) of a diffusers-layout AutoencoderKL directory."""
  from jfl.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  require_dir(vae_dir)
  config_path = os.path.join(vae_dir, "config.json")
  cfg = vae_config_from_diffusers(read_json(config_path), config_path)
  state = mapping.rename_legacy_vae_keys(read_state_dict(vae_dir, "diffusion_pytorch_model"))
  abstract = vae_lib.abstract_params(cfg)
  params = _convert(state, mapping.vae_rules(mapping.shapes_of(abstract)), abstract, (), vae_dir, progress)
  return cfg, _cast_f32(params)


def export_janusflow(params: dict, cfg: JanusFlowConfig, out_dir: str, dtype=np.float32) -> None:
  """Writes `config.json` + `model.safetensors` loadable by the reference PyTorch code."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg), f, indent=2)
  write_safetensors(mapping.to_torch(params, mapping.janusflow_rules(cfg)),
                    os.path.join(out_dir, "model.safetensors"), dtype)


def export_vae(params: dict, cfg: VAEConfig, out_dir: str, dtype=np.float32) -> None:
  """Writes a diffusers `AutoencoderKL` directory."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(vae_config_to_diffusers(cfg), f, indent=2)
  rules = mapping.vae_rules(mapping.shapes_of(params))
  write_safetensors(mapping.to_torch(params, rules), os.path.join(out_dir, "diffusion_pytorch_model.safetensors"),
                    dtype)
