"""What every console script shares: one-line errors for expected mistakes."""

import functools
import sys

from jfl.convert.hf import CheckpointError


def friendly_errors(prog: str):
  """Turns expected mistakes (bad paths, malformed files, bad values) into one line + exit 2."""
  def wrap(main):
    @functools.wraps(main)
    def run(argv=None):
      try:
        return main(argv)
      except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    return run
  return wrap
