"""A PyTorch statement of the reference `MultiModalityCausalLM` (deepseek-ai/Janus, janus/janusflow),
written from its definitions for parity tests: transformers' Llama, timm's ViT (built as the
reference's `create_siglip_vit`), and the ShallowUViT g_enc/g_dec below, under the reference's
state_dict names. `velocity_step`/`sample` follow the generation demo (§6), recomputing the
whole sequence every step; `understanding_logits` follows `prepare_inputs_embeds` + `generate`'s
first forward (§4).
"""

import functools
import json
import os

from tests import torch_refs  # noqa: F401  (torchvision shim; must precede timm/transformers)

import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
import timm.models.vision_transformer as timm_vit  # noqa: E402
import torch  # noqa: E402
from diffusers.models.embeddings import TimestepEmbedding, Timesteps  # noqa: E402
from transformers import LlamaConfig as HFLlamaConfig  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from jfl.convert import hf  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Torch reference, written from the reference definitions (uvit.py), NCHW like the original.
# ---------------------------------------------------------------------------------------------

class TorchGRN(torch.nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.weight = torch.nn.Parameter(torch.zeros(1, 1, 1, dim))
    self.bias = torch.nn.Parameter(torch.zeros(1, 1, 1, dim))

  def forward(self, x):  # NHWC
    g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
    n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
    return self.bias + x * (self.weight * n + 1)


class TorchConvNext(torch.nn.Module):
  def __init__(self, c, d, eps):
    super().__init__()
    self.depthwise = torch.nn.Conv2d(c, c, 7, padding=3, groups=c)
    self.norm = LlamaRMSNorm(c, eps)
    self.channelwise_linear_1 = torch.nn.Linear(c, 4 * c)
    self.channelwise_act = torch.nn.GELU()
    self.channelwise_norm = TorchGRN(4 * c)
    self.channelwise_linear_2 = torch.nn.Linear(4 * c, c)
    self.cond_embeds_mapper = torch.nn.Linear(d, 2 * c)

  def forward(self, x, cond):
    h = self.depthwise(x).permute(0, 2, 3, 1)
    h = self.channelwise_linear_2(self.channelwise_norm(self.channelwise_act(self.channelwise_linear_1(self.norm(h)))))
    h = h.permute(0, 3, 1, 2) + x
    scale, shift = self.cond_embeds_mapper(torch.nn.functional.silu(cond)).chunk(2, dim=1)
    return h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class TorchMid(torch.nn.Module):
  def __init__(self, c, d, cfg):
    super().__init__()
    self.res_blocks = torch.nn.ModuleList([TorchConvNext(c, d, cfg.norm_eps) for _ in range(cfg.num_blocks)])

  def forward(self, x, cond):
    for blk in self.res_blocks:
      x = blk(x, cond)
    return x


class TorchEncoder(torch.nn.Module):
  def __init__(self, cfg, d):
    super().__init__()
    c = cfg.channels
    self.time_proj = Timesteps(c, flip_sin_to_cos=True, downscale_freq_shift=0)
    self.time_embed = TimestepEmbedding(c, d)
    self.in_conv = torch.nn.Conv2d(cfg.latent_channels, c, cfg.patch_size, stride=cfg.patch_size, padding=0)
    self.mid_block = TorchMid(c, d, cfg)

  def forward(self, z, t):
    t_emb = self.time_embed(self.time_proj(t).to(z.dtype))
    return self.mid_block(self.in_conv(z), t_emb), t_emb


class TorchUnpatchify(torch.nn.Module):
  def __init__(self, c_in, c_out, p, eps):
    super().__init__()
    self.norm = LlamaRMSNorm(c_in, eps)
    self.unpatch_conv = torch.nn.Conv2d(c_in, c_out * p * p, kernel_size=1)
    self.pixel_shuffle = torch.nn.PixelShuffle(p)

  def forward(self, x):
    x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return self.pixel_shuffle(self.unpatch_conv(x))


class TorchDecoder(torch.nn.Module):
  def __init__(self, cfg, d):
    super().__init__()
    c = cfg.channels
    self.mid_block = TorchMid(2 * c, d, cfg)
    self.out_convs = torch.nn.ModuleList([TorchUnpatchify(2 * c, cfg.latent_channels, cfg.patch_size, cfg.norm_eps)])
    self.input_norm = LlamaRMSNorm(c, cfg.norm_eps)

  def forward(self, x, skip, t_emb):
    x = self.input_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    x = self.mid_block(torch.cat([x, skip], dim=1), t_emb)
    return self.out_convs[0](x)


# ---------------------------------------------------------------------------------------------
# The whole model.
# ---------------------------------------------------------------------------------------------

class _VisionTower(torch.nn.Module):
  def __init__(self, s):
    super().__init__()
    self.vision_tower = timm_vit.VisionTransformer(
        img_size=s.image_size, patch_size=s.patch_size, embed_dim=s.width, depth=s.num_blocks,
        num_heads=s.num_heads, mlp_ratio=s.mlp_dim / s.width, class_token=False, global_pool="map",
        num_classes=0, norm_layer=functools.partial(torch.nn.LayerNorm, eps=s.layer_norm_eps),
        act_layer=torch.nn.GELU, dynamic_img_size=False)


class TorchJanusFlow(torch.nn.Module):
  """The reference model at any `JanusFlowConfig` size, randomised so no weight is at its init."""

  def __init__(self, cfg, seed=0):
    super().__init__()
    self.cfg = cfg
    l, d = cfg.llm, cfg.llm.hidden_size
    self.language_model = LlamaForCausalLM(HFLlamaConfig(
        vocab_size=l.vocab_size, hidden_size=d, intermediate_size=l.intermediate_size,
        num_hidden_layers=l.num_layers, num_attention_heads=l.num_heads, num_key_value_heads=l.num_kv_heads,
        head_dim=l.head_dim, rms_norm_eps=l.rms_norm_eps, rope_theta=l.rope_theta,
        max_position_embeddings=l.max_position_embeddings, tie_word_embeddings=False,
        attn_implementation="eager"))
    self.vision_und_enc_model = _VisionTower(cfg.siglip)
    self.vision_und_enc_aligner = torch.nn.Linear(cfg.siglip.width, d)
    self.beg_of_und_embed = torch.nn.Parameter(torch.zeros(1, d))
    self.vision_gen_enc_model = TorchEncoder(cfg.gen, d)
    self.vision_gen_enc_aligner = torch.nn.Linear(cfg.gen.channels, d)
    self.vision_gen_dec_model = TorchDecoder(cfg.gen, d)
    self.vision_gen_dec_aligner_norm = LlamaRMSNorm(d, eps=l.rms_norm_eps)
    self.vision_gen_dec_aligner = torch.nn.Linear(d, cfg.gen.channels)
    torch_refs.randomize_(self, seed)

  def save_hf(self, out_dir, dtype=torch.float32):
    """config.json + model.safetensors, as the released checkpoint is laid out."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(hf.config_to_hf(self.cfg), f)
    state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})

  # --- understanding (prepare_inputs_embeds + the first forward of generate) -------------------

  @torch.no_grad()
  def understanding_logits(self, input_ids, pixel_values, images_seq_mask, images_emb_mask, attention_mask):
    """Arrays as the reference processor makes them (pixel_values [B, n, 3, H, W]) -> logits."""
    input_ids, pixel_values, images_seq_mask, images_emb_mask, attention_mask = map(
        torch.as_tensor, (input_ids, pixel_values, images_seq_mask, images_emb_mask, attention_mask))
    b, n = pixel_values.shape[:2]
    feats = self.vision_und_enc_model.vision_tower.forward_features(pixel_values.flatten(0, 1))
    img = self.vision_und_enc_aligner(feats)
    img = torch.cat([self.beg_of_und_embed[None].expand(b * n, -1, -1), img], dim=1).reshape(b, n, -1, img.shape[-1])
    embeds = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))
    embeds[images_seq_mask] = img[images_emb_mask]
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                               position_ids=position_ids).logits.numpy()

  # --- generation (demo/app_janusflow.py, without its bf16 rounding) ---------------------------

  def _cfg_inputs(self, input_ids, pad_id):
    """Cond rows then uncond rows (BOS + pad, masked), the last token dropped (§6 steps 2-4)."""
    ids = torch.as_tensor(input_ids)
    tokens = torch.cat([ids, ids])
    tokens[len(ids):, 1:] = pad_id
    embeds = self.language_model.get_input_embeddings()(tokens)[:, :-1]
    mask = torch.ones(tokens.shape[0], ids.shape[1] - 1 + 1 + self.cfg.num_image_tokens, dtype=torch.long)
    mask[len(ids):, 1:ids.shape[1] - 1] = 0
    return embeds, mask

  @torch.no_grad()
  def velocity_step(self, input_ids, z, t, cfg_weight, pad_id, tap_layer=None):
    """One CFG velocity: z [P, 4, h, w] NCHW, t in [0, 1) -> [P, 4, h, w] (and the tap if asked)."""
    embeds, mask = self._cfg_inputs(input_ids, pad_id)
    z = torch.as_tensor(z)
    z_in = torch.cat([z, z])
    x_emb, t_emb = self.vision_gen_enc_model(z_in, torch.full((z_in.shape[0],), float(t) * 1000.0))
    tokens = self.vision_gen_enc_aligner(x_emb.flatten(2).transpose(1, 2))
    seq = torch.cat([embeds, t_emb[:, None], tokens], dim=1)
    out = self.language_model.model(inputs_embeds=seq, attention_mask=mask, output_hidden_states=True)
    p = tokens.shape[1]
    h = self.vision_gen_dec_aligner(self.vision_gen_dec_aligner_norm(out.last_hidden_state[:, -p:]))
    g = x_emb.shape[-1]
    v = self.vision_gen_dec_model(h.transpose(1, 2).reshape(h.shape[0], -1, g, g), x_emb, t_emb)
    v_c, v_u = v.chunk(2)
    v = cfg_weight * v_c - (cfg_weight - 1) * v_u
    if tap_layer is None:
      return v.numpy()
    return v.numpy(), out.hidden_states[tap_layer][:, -p:].numpy()

  def sample(self, input_ids, noise, num_steps, cfg_weight, pad_id):
    """The demo's Euler loop in float32: t = s / N, z <- z + v / N. noise [P, 4, h, w]."""
    z = np.asarray(noise, np.float32)
    for s in range(num_steps):
      z = z + self.velocity_step(input_ids, z, s / num_steps, cfg_weight, pad_id) / num_steps
    return z
