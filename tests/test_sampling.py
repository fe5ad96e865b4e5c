"""The flow sampler against the PyTorch reference step/loop (tests/reference_torch.py), float32, tiny model."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from tests.reference_torch import TorchJanusFlow
from tests.torch_refs import rel_err

from jfl.cli import generate as generate_cli  # noqa: E402
from jfl.convert import hf  # noqa: E402
from jfl.demo import tokenizer as demo_tok  # noqa: E402
from jfl.models import vae as vae_lib  # noqa: E402
from jfl.models.config import JanusFlowConfig  # noqa: E402
from jfl.pipeline import JanusFlowPipeline  # noqa: E402
from jfl.sampling import flow  # noqa: E402

CFG = JanusFlowConfig.tiny()
PAD = 2
N = CFG.latent_size


def build_checkpoint(root):
  """The torch reference (random, perturbed) saved HF-style with the demo tokenizer, and a tiny VAE.

  Returns (reference, model_dir, vae_dir)."""
  ref = TorchJanusFlow(CFG, seed=0)
  model_dir, vae_dir = os.path.join(root, "model"), os.path.join(root, "vae")
  ref.save_hf(model_dir)
  demo_tok.build_tokenizer(model_dir)
  rng = np.random.default_rng(1)

  def fill(path, x):  # random params from the abstract tree: no VAE init compilation
    name, noise = path[-1].key, rng.standard_normal(x.shape).astype(np.float32)
    if name == "kernel":
      return noise / np.sqrt(np.prod(x.shape[:-1]))
    return 1 + 0.1 * noise if name == "scale" else 0.1 * noise

  params = jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(vae_lib.abstract_params(CFG.vae)))
  hf.export_vae(params, CFG.vae, vae_dir)
  return ref, model_dir, vae_dir


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
  """Compilation dominates these tests; XLA's optimisations do not change float32 results here."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  ref, model_dir, vae_dir = build_checkpoint(str(tmp_path_factory.mktemp("ckpt")))
  return ref, JanusFlowPipeline.from_pretrained(model_dir, vae_dir=vae_dir), model_dir, vae_dir


def _prompts(rng, lengths):
  """Random prompts (BOS = 1 first, no pad ids), one per length."""
  out = []
  for n in lengths:
    ids = rng.integers(10, CFG.llm.vocab_size, n)
    ids[0] = 1
    out.append(ids)
  return out


def _latents(rng, b):
  return rng.standard_normal((b, N, N, CFG.gen.latent_channels)).astype(np.float32)


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def test_demo_tokenizer_fits_tiny_vocab():
  assert demo_tok.vocab_size() < CFG.llm.vocab_size


@pytest.mark.parametrize("cfg_weight", [1.0, 2.5])
def test_velocity_matches_reference(setup, cfg_weight):
  ref, pipe, _, _ = setup
  rng = np.random.default_rng(1)
  ids = np.stack(_prompts(rng, [7, 7]))
  z = _latents(rng, 2)
  want = _nhwc(ref.velocity_step(ids, _nchw(z), 0.3, cfg_weight, pad_id=PAD))
  cached = np.asarray(pipe.velocity(ids, z, 0.3, cfg_weight, pad_id=PAD))
  uncached = np.asarray(flow.velocity(pipe.model, pipe.params, ids, z, 0.3, cfg_weight, PAD, use_cache=False))
  assert cached.shape == z.shape and cached.dtype == np.float32
  assert rel_err(cached, want) <= 1e-5, rel_err(cached, want)
  assert rel_err(uncached, want) <= 1e-5, rel_err(uncached, want)
  assert rel_err(cached, uncached) <= 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prompts_compute_what_each_computes_alone(setup, side):
  ref, pipe, _, _ = setup
  rng = np.random.default_rng(2)
  a, b = _prompts(rng, [9, 5])
  ids = np.full((2, 9), PAD)
  ids[0] = a
  if side == "left":
    ids[1, 4:] = b
  else:
    ids[1, :5] = b
  z = _latents(rng, 2)
  want = np.concatenate([_nhwc(ref.velocity_step(p[None], _nchw(z[i:i + 1]), 0.5, 3.0, pad_id=PAD))
                         for i, p in enumerate((a, b))])
  got = np.asarray(pipe.velocity(ids, z, 0.5, 3.0, pad_id=PAD))
  for i in range(2):
    assert rel_err(got[i], want[i]) <= 1e-5, (i, rel_err(got[i], want[i]))


def test_prepare_prompt_layout():
  ids = np.array([[PAD, PAD, 1, 11, 12, 99], [1, 21, 22, 23, 99, PAD]])
  p = flow.prepare_prompt(ids, PAD, guided=True, max_positions=512, num_new=5)
  np.testing.assert_array_equal(p.ids, [[PAD, PAD, 1, 11, 12], [PAD, 1, 21, 22, 23],
                                        [PAD, PAD, 1, PAD, PAD], [PAD, 1, PAD, PAD, PAD]])
  np.testing.assert_array_equal(p.visible, [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 1, 0, 0], [0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(p.positions[:2], [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3]])
  np.testing.assert_array_equal(p.lengths, [3, 4, 3, 4])
  single = flow.prepare_prompt(ids[:1, 2:], None, guided=False, max_positions=512, num_new=5)
  np.testing.assert_array_equal(single.ids, [[1, 11, 12]])
  np.testing.assert_array_equal(single.positions, [[0, 1, 2]])


def test_sample_latents_matches_reference_loop(setup):
  ref, pipe, _, _ = setup
  rng = np.random.default_rng(3)
  ids = np.stack(_prompts(rng, [6, 6]))
  noise = _latents(rng, 2)
  want = _nhwc(ref.sample(ids, _nchw(noise), 4, 2.0, pad_id=PAD))
  cached = np.asarray(pipe.sample_latents(ids, noise, num_steps=4, cfg_weight=2.0, pad_id=PAD))
  uncached = np.asarray(flow.sample_latents(pipe.model, pipe.params, ids, noise, 4, 2.0, PAD, use_cache=False))
  assert rel_err(cached, want) <= 1e-5, rel_err(cached, want)
  assert rel_err(uncached, cached) <= 1e-5, rel_err(uncached, cached)
  assert rel_err(noise, want) > 0.05  # the loop moved the latents


def test_generate_images_and_seeds(setup):
  _, pipe, _, _ = setup
  images = pipe.generate("red circle", num_images=2, seed=3, num_steps=2, cfg_weight=2.0)
  assert len(images) == 2 and all(im.size == (CFG.image_size,) * 2 and im.mode == "RGB" for im in images)
  a, b = (np.asarray(im, np.int16) for im in images)
  assert np.abs(a - b).max() > 0  # different seeds, different images
  ids, pad = pipe.generation_ids(["red circle"] * 2)
  assert ids[0, -1] == pipe.tokenizer.convert_tokens_to_ids(demo_tok.BOI) and ids[0, 0] == 0  # BOS id 0
  latents = pipe.sample_latents(ids, flow.noise_for_seeds([3, 4], (N, N, 4)), 2, 2.0, pad)
  np.testing.assert_array_equal(np.asarray(pipe.decode(latents)), np.stack([a, b]).astype(np.uint8))
  alone = np.asarray(pipe.generate("red circle", num_images=1, seed=[4], num_steps=2)[0], np.int16)
  assert np.abs(alone - b).max() <= 1  # image k depends only on its own seed


def test_bad_inputs(setup):
  _, pipe, model_dir, _ = setup
  ids = np.stack(_prompts(np.random.default_rng(4), [5]))
  z = _latents(np.random.default_rng(5), 1)
  with pytest.raises(ValueError, match="cfg_weight must be >= 1"):
    pipe.velocity(ids, z, 0.1, 0.5)
  with pytest.raises(ValueError, match="num_steps must be a positive integer"):
    pipe.sample_latents(ids, z, num_steps=0)
  with pytest.raises(ValueError, match="exceeds the model's context of 512"):
    pipe.sample_latents(np.ones((1, 600), np.int32), z, 2)
  with pytest.raises(ValueError, match=r"noise must be \[batch=1"):
    pipe.sample_latents(ids, z[:, :4], 2)
  bare = JanusFlowPipeline(pipe.config, pipe.params, pipe.vae_params, tokenizer=None, source=model_dir)
  with pytest.raises(ValueError, match="no tokenizer"):
    bare.generate("red circle")


def test_cli_generate(setup, tmp_path, capsys):
  _, pipe, model_dir, vae_dir = setup
  out = str(tmp_path / "img.png")
  generate_cli.main(["--ckpt", model_dir, "--vae-dir", vae_dir, "--prompt", "blue square", "--num-images", "2",
                     "--steps", "2", "--cfg", "2.0", "--seed", "7", "--out", out, "--dtype", "float32"])
  err = capsys.readouterr().err
  assert "2/2" in err  # progress bar reached the last step
  want = pipe.generate("blue square", num_images=2, seed=7, num_steps=2, cfg_weight=2.0)
  for k in range(2):
    got = np.asarray(Image.open(tmp_path / f"img-{k}.png"), np.int16)
    assert np.abs(got - np.asarray(want[k], np.int16)).max() <= 1
  assert Image.open(out).size == (2 * CFG.image_size, CFG.image_size)


@pytest.mark.parametrize("flags,message", [
    (["--cfg", "0.5"], "cfg_weight must be >= 1"),
    (["--steps", "0"], "num_steps must be a positive integer"),
    (["--prompt", "word " * 600], "exceeds the model's context"),
    (["--no-tokenizer"], "no tokenizer"),
])
def test_cli_generate_errors(setup, tmp_path, capsys, flags, message):
  _, _, model_dir, vae_dir = setup
  if flags == ["--no-tokenizer"]:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
      os.symlink(os.path.join(model_dir, name), bare / name)
    model_dir, flags = str(bare), []
  argv = ["--ckpt", model_dir, "--vae-dir", vae_dir, "--prompt", "red circle", "--steps", "1",
          "--out", str(tmp_path / "x.png"), *flags]
  with pytest.raises(SystemExit) as e:
    generate_cli.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and message in err[-1] and err[-1].startswith("jfl-generate: error:")
