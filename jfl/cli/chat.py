"""jfl-chat: ask a question about image(s) (greedy by default).

  jfl-chat --ckpt ckpt/janusflow --image photo.png --question "What is in the image?"
  jfl-chat --ckpt ckpt/janusflow --image a.png --image b.png --question "What differs?" --temperature 0.1
"""

import argparse
import sys
import time

from jfl import processor
from jfl.cli.common import friendly_errors
from jfl.sampling import text


@friendly_errors("jfl-chat")
def main(argv=None):
  ap = argparse.ArgumentParser(prog="jfl-chat", description=__doc__.splitlines()[0])
  ap.add_argument("--ckpt", required=True, help="jfl-convert output or HF-layout JanusFlow directory (with tokenizer)")
  ap.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
  ap.add_argument("--question", required=True)
  ap.add_argument("--max-new-tokens", type=int, default=256)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  ap.add_argument("--top-p", type=float, default=0.95)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="compute dtype")
  args = ap.parse_args(argv)
  text.check_options(args.max_new_tokens, args.temperature, args.top_p)
  images = [processor.load_image(p) for p in args.image]  # fail on a bad image before loading the model

  from jfl.pipeline import JanusFlowPipeline  # pylint: disable=g-import-not-at-top  (slow import)
  start = time.time()
  print(f"loading {args.ckpt} ...", file=sys.stderr)
  pipe = JanusFlowPipeline.from_pretrained(args.ckpt, dtype=args.dtype)
  print(f"loaded in {time.time() - start:.1f}s; answering (includes compilation)", file=sys.stderr)
  start = time.time()
  answer = pipe.chat(images or None, args.question, args.max_new_tokens, args.temperature, args.top_p, args.seed)
  print(f"answered in {time.time() - start:.1f}s", file=sys.stderr)
  print(answer)


if __name__ == "__main__":
  main()
