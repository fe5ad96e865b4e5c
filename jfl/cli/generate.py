"""jfl-generate: text -> images with the rectified-flow sampler (30 Euler steps, CFG 2 by default).

  jfl-generate --ckpt ckpt/janusflow --prompt "a red apple on a table" --num-images 4 --out apple.png
  jfl-generate --ckpt JanusFlow-1.3B --vae-dir sdxl-vae --prompt "..." --steps 30 --cfg 2.0 --seed 0

Writes one PNG per image (`apple-0.png`, `apple-1.png`, ...) and a grid of all of them at `--out`.
"""

import argparse
import math
import os
import sys
import time

from PIL import Image
from tqdm import tqdm

from jfl.cli.common import friendly_errors
from jfl.sampling import flow


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
  """Images of equal size tiled row-major, `cols` per row (default: about square)."""
  cols = cols or math.ceil(math.sqrt(len(images)))
  rows = math.ceil(len(images) / cols)
  w, h = images[0].size
  grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
  for k, img in enumerate(images):
    grid.paste(img, ((k % cols) * w, (k // cols) * h))
  return grid


def image_paths(out: str, n: int) -> list[str]:
  stem, ext = os.path.splitext(out)
  return [f"{stem}-{k}{ext or '.png'}" for k in range(n)]


@friendly_errors("jfl-generate")
def main(argv=None):
  ap = argparse.ArgumentParser(prog="jfl-generate", description=__doc__.splitlines()[0])
  ap.add_argument("--ckpt", required=True, help="jfl-convert output or HF-layout JanusFlow directory (with tokenizer)")
  ap.add_argument("--vae-dir", help="diffusers AutoencoderKL directory (needed unless --ckpt holds the VAE)")
  ap.add_argument("--prompt", required=True, action="append", help="text prompt; repeat for several prompts")
  ap.add_argument("--num-images", type=int, default=1, help="images per prompt")
  ap.add_argument("--steps", type=int, default=30, help="Euler steps")
  ap.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance weight w >= 1 (1 = off)")
  ap.add_argument("--seed", type=int, default=0, help="image k uses seed + k")
  ap.add_argument("--out", default="out.png", help="grid path; images go next to it as <stem>-<k>.png")
  ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="compute dtype")
  args = ap.parse_args(argv)
  flow.check_options(args.steps, args.cfg)
  if args.num_images < 1:
    raise ValueError(f"--num-images must be >= 1, got {args.num_images}")

  from jfl.pipeline import JanusFlowPipeline  # pylint: disable=g-import-not-at-top  (slow import)
  start = time.time()
  print(f"loading {args.ckpt} ...", file=sys.stderr)
  pipe = JanusFlowPipeline.from_pretrained(args.ckpt, vae_dir=args.vae_dir, dtype=args.dtype)
  print(f"loaded in {time.time() - start:.1f}s; sampling (the first step includes compilation)", file=sys.stderr)
  n = len(args.prompt) * args.num_images
  with tqdm(total=args.steps, desc=f"{n} image(s)", unit="step", file=sys.stderr) as bar:
    images = pipe.generate(args.prompt, args.num_images, args.seed, args.steps, args.cfg,
                           progress=lambda _: bar.update(1))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  for img, path in zip(images, image_paths(args.out, n)):
    img.save(path)
  make_grid(images).save(args.out)
  print(f"wrote {n} image(s) {image_paths(args.out, n)[0]} ... and the grid {args.out} "
        f"({time.time() - start:.1f}s)")


if __name__ == "__main__":
  main()
