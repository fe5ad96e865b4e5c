"""Loading `configs/*.py` with `--config.a.b=value` overrides (ml_collections config_flags).

Configs are locked: an override of a field that does not exist is an error naming the field.
"""

import os
import re
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags


def load_config(config: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """`config` is `path/to/file.py` or `path/to/file.py:arg`; overrides are `--config.x=y` strings."""
  path = config.split(":", 1)[0]
  if not os.path.isfile(path):
    raise ValueError(f"config file {path}: no such file")
  # Config files import their siblings as `configs.<name>`: put the project root on the path.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    raise ValueError(f"unknown argument {bad[0]!r} (overrides look like --config.model.llm.num_layers=4)")
  argv = ["jfl", f"--config={config}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True, sys_argv=argv)
  try:
    fv(argv)
  except flags.Error as e:
    raise ValueError(str(e)) from None
  except (AttributeError, KeyError) as e:  # ml_collections' message for an unknown field
    field = next((o.split("=")[0][2:] for o in overrides if _missing(fv, o)), "?")
    hint = re.search(r"Did you mean [^?]*\?", str(e))
    raise ValueError(f"unknown config field {field}" + (f" ({hint.group(0)})" if hint else "")) from None
  return fv.config


def split_list(value) -> list[str]:
  """A ';'-separated config field ("a; b;") or a sequence -> its non-empty, stripped items."""
  items = value.split(";") if isinstance(value, str) else list(value)
  return [s.strip() for s in items if s and s.strip()]


def split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.*` overrides from the other command-line arguments."""
  overrides = [a for a in argv if a.startswith("--config.")]
  return [a for a in argv if not a.startswith("--config.")], overrides


def _missing(fv, override: str) -> bool:
  node = fv["config"].value
  for part in override.split("=", 1)[0][len("--config."):].split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return True
    node = node[part]
  return False
