"""Strict conversion: bad directories fail naming the key/path; the CLI converts and exports."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from jfl import checkpoint
from jfl.cli import convert as convert_cli
from jfl.convert import hf, mapping
from jfl.models import janusflow
from jfl.models.config import JanusFlowConfig
from jfl.pipeline import JanusFlowPipeline

CFG = JanusFlowConfig.tiny()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A tiny random JanusFlow in the HF layout (with the attn_pool tensors the release carries)."""
  path = tmp_path_factory.mktemp("model")
  params = jax.tree.map(np.asarray, janusflow.init_params(CFG, jax.random.key(0)))
  hf.export_janusflow(params, CFG, str(path))
  state = hf.read_state_dict(str(path))
  state["vision_und_enc_model.vision_tower.attn_pool.latent"] = np.zeros((1, 1, CFG.siglip.width), np.float32)
  safetensors.numpy.save_file(state, str(path / "model.safetensors"))
  return path


def corrupt(model_dir, tmp_path, edit):
  shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
  state = hf.read_state_dict(str(tmp_path))
  edit(state)
  safetensors.numpy.save_file(state, str(tmp_path / "model.safetensors"))
  return str(tmp_path)


Q = "language_model.model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop(Q), f"missing tensor {Q}"),
    (lambda s: s.update({Q: np.zeros((3, 3), np.float32)}), f"tensor {Q} has shape [3, 3], expected [64, 64]"),
    (lambda s: s.update({"vision_gen_enc_model.extra.weight": np.zeros(2, np.float32)}),
     "unexpected tensor vision_gen_enc_model.extra.weight [2]"),
])
def test_corrupted_checkpoint_names_the_key(model_dir, tmp_path, edit, message):
  with pytest.raises(hf.CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
    hf.load_janusflow(corrupt(model_dir, tmp_path, edit), CFG.vae)


def test_every_problem_is_listed(model_dir, tmp_path):
  path = corrupt(model_dir, tmp_path, lambda s: (s.pop(Q), s.pop("beg_of_und_embed")))
  with pytest.raises(hf.CheckpointError) as e:
    hf.load_janusflow(path, CFG.vae)
  assert "2 problem(s)" in str(e.value) and "beg_of_und_embed" in str(e.value) and Q in str(e.value)


def test_bad_directories(model_dir, tmp_path):
  with pytest.raises(hf.CheckpointError, match="not a directory"):
    hf.load_janusflow(str(tmp_path / "nope"))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(hf.CheckpointError, match="config.json: not valid JSON"):
    hf.load_janusflow(str(tmp_path))
  shutil.copy(model_dir / "config.json", tmp_path)
  with pytest.raises(hf.CheckpointError, match="no model.safetensors, sharded index or pytorch_model.bin"):
    hf.load_janusflow(str(tmp_path), CFG.vae)
  (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
  with pytest.raises(hf.CheckpointError, match="model.safetensors: cannot read safetensors file"):
    hf.load_janusflow(str(tmp_path), CFG.vae)
  cfg = json.loads((model_dir / "config.json").read_text())
  cfg["language_config"]["hidden_act"] = "gelu"
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.CheckpointError, match="language_config.hidden_act='gelu' is not supported"):
    hf.load_janusflow(str(tmp_path), CFG.vae)


def test_cli_converts_exports_and_round_trips(model_dir, tmp_path, capsys):
  vae_params = jax.tree.map(np.asarray, _tiny_vae_params())
  hf.export_vae(vae_params, CFG.vae, str(tmp_path / "vae"))
  convert_cli.main(["--model-dir", str(model_dir), "--vae-dir", str(tmp_path / "vae"), "--out", str(tmp_path / "ckpt")])
  assert "parameters" in capsys.readouterr().out
  assert checkpoint.is_converted(str(tmp_path / "ckpt"))
  pipe = JanusFlowPipeline.from_pretrained(str(tmp_path / "ckpt"))
  _, params = hf.load_janusflow(str(model_dir), CFG.vae)
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), params, pipe.params))
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), vae_params, pipe.vae_params))
  convert_cli.export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"),
                           "--vae-out", str(tmp_path / "vae2")])
  src, out = hf.read_state_dict(str(model_dir)), hf.read_state_dict(str(tmp_path / "hf"))
  assert set(src) - set(out) == {"vision_und_enc_model.vision_tower.attn_pool.latent"}
  assert all(np.array_equal(out[k], src[k]) for k in out)
  vae_src = hf.read_state_dict(str(tmp_path / "vae"), "diffusion_pytorch_model")
  vae_out = hf.read_state_dict(str(tmp_path / "vae2"), "diffusion_pytorch_model")
  assert set(vae_src) == set(vae_out) and all(np.array_equal(vae_out[k], vae_src[k]) for k in vae_src)


def test_cli_errors_are_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    convert_cli.main(["--model-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jfl-convert: error:") and "missing" in err and len(err.splitlines()) == 1


def _tiny_vae_params():
  from jfl.models import vae
  x = np.zeros((1, CFG.image_size, CFG.image_size, 3), np.float32)
  params = vae.AutoencoderKL(CFG.vae).init(jax.random.key(1), x)["params"]
  import flax.linen as nn
  return jax.tree.map(lambda p: p + 0.01, nn.meta.unbox(params))


def test_vae_rules_cover_every_leaf():
  from jfl.models import vae
  shapes = mapping.shapes_of(vae.abstract_params(CFG.vae))
  rules = mapping.vae_rules(shapes)
  assert {r.dst for r in rules} == set(shapes)
  assert "encoder.mid_block.attentions.0.to_out.0.weight" in {r.src for r in rules}
  assert os.path.basename(__file__) == "test_convert.py"
