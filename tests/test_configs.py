"""configs/*.py load with --config overrides; unknown fields are errors that name them."""

import glob
import os

import pytest

from jfl.config_utils import load_config
from jfl.models.config import JanusFlowConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_released_config_is_the_reference():
  cfg = JanusFlowConfig.from_dict(load_config(f"{ROOT}/configs/janusflow_1_3b.py").model.to_dict())
  assert cfg == JanusFlowConfig()
  assert (cfg.llm.hidden_size, cfg.llm.num_layers, cfg.llm.vocab_size, cfg.siglip.num_blocks) == (2048, 24, 102400, 24)
  assert (cfg.num_image_tokens, cfg.latent_size, cfg.vae.scaling_factor) == (576, 48, 0.13025)


def test_override_reaches_the_model_config():
  config = load_config(f"{ROOT}/configs/tiny.py", ["--config.model.llm.num_layers=4",
                                                   "--config.model.gen.channels=24"])
  cfg = JanusFlowConfig.from_dict(config.model.to_dict())
  assert cfg.llm.num_layers == 4 and cfg.gen.channels == 24
  assert cfg.siglip == JanusFlowConfig.tiny().siglip


@pytest.mark.parametrize("override, message", [
    ("--config.model.llm.num_layerz=4", "unknown config field config.model.llm.num_layerz"),
    ("--config.model.llm.num_layers=four", "num_layers=four"),
    ("--model.llm.num_layers=4", "unknown argument"),
])
def test_bad_overrides_are_named(override, message):
  with pytest.raises(ValueError, match=message):
    load_config(f"{ROOT}/configs/tiny.py", [override])


def test_unknown_field_in_dict_is_named():
  d = JanusFlowConfig.tiny().to_dict()
  d["gen"]["chanels"] = 3
  with pytest.raises(ValueError, match=r"model\.gen\.chanels"):
    JanusFlowConfig.from_dict(d)


def test_every_config_file_loads():
  for path in sorted(glob.glob(f"{ROOT}/configs/*.py")):
    if not path.endswith("__init__.py"):
      assert "model" in load_config(path), path


def test_missing_config_file():
  with pytest.raises(ValueError, match="no such file"):
    load_config(f"{ROOT}/configs/nope.py")
