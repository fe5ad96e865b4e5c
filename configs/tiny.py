"""The released structure at toy sizes (2 LLM layers x 64 wide, 32 px images); seconds on CPU.

  python -m pytest tests/test_configs.py
"""

from configs import janusflow_1_3b
from jfl.models.config import JanusFlowConfig


def get_config(arg: str | None = None):
  config = janusflow_1_3b.get_config(arg)
  config.model = janusflow_1_3b.model_config(JanusFlowConfig.tiny())
  config.compute_dtype = "float32"
  return config
