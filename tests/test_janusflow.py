"""The composed model against the PyTorch reference, through HF-layout directories and the converter."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.reference_torch import TorchJanusFlow
from tests.torch_refs import randomize_, rel_err

import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402

from jfl.convert import hf, mapping  # noqa: E402
from jfl.models import janusflow  # noqa: E402
from jfl.models.config import JanusFlowConfig  # noqa: E402
from jfl.pipeline import JanusFlowPipeline  # noqa: E402

CFG = JanusFlowConfig.tiny()
P1 = CFG.num_image_tokens + 1


def torch_vae(seed=0):
  """A diffusers AutoencoderKL with the tiny config's VAE, randomised."""
  v = CFG.vae
  n = len(v.block_out_channels)
  return randomize_(AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=v.latent_channels, block_out_channels=v.block_out_channels,
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      layers_per_block=v.layers_per_block, norm_num_groups=v.norm_num_groups, scaling_factor=v.scaling_factor,
      sample_size=CFG.image_size), seed)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The torch reference model + VAE and the pipeline loaded from their HF/diffusers directories."""
  ref, ref_vae = TorchJanusFlow(CFG, seed=0), torch_vae()
  path, vae_path = str(tmp_path_factory.mktemp("hf")), str(tmp_path_factory.mktemp("vae"))
  ref.save_hf(path)
  ref_vae.save_pretrained(vae_path)
  pipe = JanusFlowPipeline.from_pretrained(path, vae_dir=vae_path)
  assert dataclasses.replace(pipe.config, repa=CFG.repa) == CFG  # REPA is not part of the release
  return ref, pipe, path, ref_vae


def understanding_inputs(rng):
  """Two left-padded rows: one image in row 0, two in row 1 (the second slot of row 0 empty)."""
  t = 2 * P1 + 9
  ids = rng.integers(10, CFG.llm.vocab_size, (2, t))
  attention = np.ones((2, t), bool)
  attention[0, :P1 + 1] = False                                  # left padding of the shorter row
  seq = np.zeros((2, t), bool)
  seq[0, P1 + 3:2 * P1 + 3] = True
  seq[1, 2:2 + P1] = True
  seq[1, P1 + 5:2 * P1 + 5] = True
  emb = np.zeros((2, 2, P1), bool)
  emb[0, 0] = emb[1, 0] = emb[1, 1] = True
  pixels = rng.uniform(-1, 1, (2, 2, 3, CFG.image_size, CFG.image_size)).astype(np.float32)
  pixels[0, 1] = 0
  return ids, pixels, seq, emb, attention


def test_understanding_logits_match_reference(reference):
  ref, pipe, *_ = reference
  ids, pixels, seq, emb, attention = understanding_inputs(np.random.default_rng(0))
  want = ref.understanding_logits(ids, pixels, seq, emb, attention)
  got = np.asarray(pipe.understanding_logits(ids, pixels, seq, emb, attention))
  assert got.dtype == np.float32 and got.shape == (2, ids.shape[1], CFG.llm.vocab_size)
  assert rel_err(got[attention], want[attention]) <= 1e-5, rel_err(got[attention], want[attention])


def cfg_prefix(pipe, ids, pad_id):
  """The reference's CFG rows: cond prompts, then BOS + masked pads; the last token dropped."""
  tokens = np.concatenate([ids, ids])
  tokens[len(ids):, 1:] = pad_id
  embeds = pipe.model.apply({"params": pipe.params}, jnp.asarray(tokens), method=pipe.model.embed_tokens)[:, :-1]
  mask = np.ones(embeds.shape[:2], bool)
  mask[len(ids):, 1:] = False
  return embeds, mask


@pytest.mark.parametrize("cfg_weight", [1.0, 2.5])
def test_velocity_matches_reference(reference, cfg_weight):
  ref, pipe, *_ = reference
  rng = np.random.default_rng(1)
  ids = rng.integers(10, CFG.llm.vocab_size, (2, 7))
  ids[:, 0] = 1
  z = rng.standard_normal((2, CFG.latent_size, CFG.latent_size, 4)).astype(np.float32)
  t = 0.3
  want, want_tap = ref.velocity_step(ids, z.transpose(0, 3, 1, 2), t, cfg_weight, pad_id=2, tap_layer=1)
  embeds, mask = cfg_prefix(pipe, ids, pad_id=2)
  v, aux = jax.jit(lambda p, e, m, z, t: pipe.model.apply({"params": p}, e, m, z, t, tap_layer=1,
                                                         method=pipe.model.velocity))(
      pipe.params, embeds, mask, np.concatenate([z, z]), np.full((4,), t, np.float32))
  v = np.asarray(v)
  got = cfg_weight * v[:2] - (cfg_weight - 1) * v[2:]
  assert got.shape == z.shape
  assert rel_err(got, want.transpose(0, 2, 3, 1)) <= 1e-5, rel_err(got, want.transpose(0, 2, 3, 1))
  assert rel_err(aux["tap"], want_tap) <= 1e-5, rel_err(aux["tap"], want_tap)


def test_full_size_parameter_count():
  """The 1.3B tree has the released tensors minus the unused SigLIP attention-pool head."""
  cfg = JanusFlowConfig()
  shapes = mapping.shapes_of(janusflow.abstract_params(cfg))
  assert sum(int(np.prod(s)) for s in shapes.values()) == 2_046_367_504 - 12_595_200
  rules = mapping.janusflow_rules(cfg)
  assert sum(len(r.sources()) for r in rules) == 587 - 13  # 13 attn_pool tensors are ignored
  assert {r.dst for r in rules} == set(shapes)
  assert shapes[("llm", "layers", "self_attn", "q_proj", "kernel")] == (24, 2048, 16, 128)
  assert shapes[("siglip", "blocks", "attn", "qkv", "kernel")] == (24, 1024, 3, 16, 64)


def test_round_trip_is_exact(reference, tmp_path):
  """HF -> jfl -> HF reproduces every tensor (attn_pool, unused by the reference, is not exported)."""
  ref, pipe, path, _ = reference
  hf.export_janusflow(jax.tree.map(np.asarray, pipe.params), pipe.config, str(tmp_path))
  back = hf.read_state_dict(str(tmp_path))
  source = {k: v.numpy() for k, v in ref.state_dict().items() if ".attn_pool." not in k}
  assert set(back) == set(source)
  for k, v in source.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
  assert hf.config_from_hf(hf.read_json(str(tmp_path / "config.json")), CFG.vae) == pipe.config


def test_bfloat16_checkpoint_round_trip(tmp_path):
  """A bf16 checkpoint (as released) loads as float32 and exports back to identical bf16 bits."""
  import ml_dtypes
  ref = TorchJanusFlow(CFG, seed=3)
  ref.save_hf(str(tmp_path / "src"), dtype=torch.bfloat16)
  cfg, params = hf.load_janusflow(str(tmp_path / "src"), CFG.vae)
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))
  hf.export_janusflow(params, cfg, str(tmp_path / "out"), dtype=ml_dtypes.bfloat16)
  src, out = hf.read_state_dict(str(tmp_path / "src")), hf.read_state_dict(str(tmp_path / "out"))
  for k, v in out.items():
    assert v.dtype == src[k].dtype and np.array_equal(v.view(np.uint16), src[k].view(np.uint16)), k


def test_sharded_and_bin_checkpoints_load_identically(reference, tmp_path):
  ref, pipe, path, _ = reference
  state = {k: v.detach().contiguous() for k, v in ref.state_dict().items()}
  keys = sorted(state)
  import safetensors.torch, json, shutil
  shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
  for name, ks in shards.items():
    safetensors.torch.save_file({k: state[k] for k in ks}, str(tmp_path / name))
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
  shutil.copy(f"{path}/config.json", tmp_path)
  _, sharded = hf.load_janusflow(str(tmp_path), CFG.vae)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  torch.save(state, str(bin_dir / "pytorch_model.bin"))
  shutil.copy(f"{path}/config.json", bin_dir)
  _, from_bin = hf.load_janusflow(str(bin_dir), CFG.vae)
  for tree in (sharded, from_bin):
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), tree, pipe.params))


def test_vae_encode_decode_match_diffusers(reference):
  _, pipe, _, ref_vae = reference
  images = np.random.default_rng(2).uniform(-1, 1, (2, CFG.image_size, CFG.image_size, 3)).astype(np.float32)
  with torch.no_grad():
    mean = ref_vae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist.mean.numpy()
    latents = mean.transpose(0, 2, 3, 1) * CFG.vae.scaling_factor
    decoded = ref_vae.decode(torch.from_numpy(mean)).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(pipe.encode(images))
  assert rel_err(got, latents) <= 1e-5, rel_err(got, latents)
  want = ((np.clip(decoded, -1, 1) + 1) / 2 * 255).astype(np.uint8)
  out = np.asarray(pipe.decode(latents))
  assert out.dtype == np.uint8 and out.shape == images.shape
  # float32 rounding may move a value across an integer boundary before truncation: at most by 1
  assert np.abs(out.astype(int) - want).max() <= 1 and np.mean(out == want) > 0.99
