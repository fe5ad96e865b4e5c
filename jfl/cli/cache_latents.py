"""jfl-cache-latents: encode a generation dataset once with the frozen SDXL-VAE (+ SigLIP REPA targets).

  jfl-cache-latents arrayrecord:/data/prepared/captions --ckpt ckpt/janusflow_1_3b --out /data/latents/captions
  # several machines: --shard 0/4 ... --shard 3/4, each with its own --out
  # then train with --config.data.cached_latents=True --config.data.gen_sources=arrayrecord:/data/latents/captions

The checkpoint is a directory written by jfl-convert with --vae-dir (VAE and SigLIP params).
Storage per 384 px image: latents 36 KiB (float32), REPA targets 1.1 MiB (float16; --no-repa to skip).
"""

import argparse

from tqdm import tqdm

from jfl.cli.common import friendly_errors


def _shard(text: str) -> tuple[int, int]:
  try:
    i, n = (int(v) for v in text.split("/"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--shard {text!r}: expected INDEX/COUNT, e.g. 0/4") from None
  return i, n


@friendly_errors("jfl-cache-latents")
def main(argv=None):
  ap = argparse.ArgumentParser(prog="jfl-cache-latents", description=__doc__.splitlines()[0])
  ap.add_argument("sources", nargs="+", help="image-caption source specs FORMAT:PATH[?key=value&...]")
  ap.add_argument("--ckpt", required=True, help="converted checkpoint directory (jfl-convert --vae-dir)")
  ap.add_argument("--out", required=True, help="output directory (must not hold shards yet)")
  ap.add_argument("--batch-size", type=int, default=32, help="images per encoder call (all local devices)")
  ap.add_argument("--no-repa", action="store_true", help="cache only VAE latents (train with cached_repa=False)")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="encoder compute dtype")
  ap.add_argument("--seed", type=int, default=0, help="seed of the random square crops")
  ap.add_argument("--shard", type=_shard, default=(0, 1), help="INDEX/COUNT: encode every COUNT-th record")
  ap.add_argument("--threads", type=int, default=8, help="image decoding threads")
  ap.add_argument("--records-per-shard", type=int, default=10000)
  ap.add_argument("--limit", type=int, default=None, help="encode at most this many records")
  args = ap.parse_args(argv)
  from jfl.data import latent_cache  # pylint: disable=g-import-not-at-top  (imports jax)
  with tqdm(desc="images", unit="img", smoothing=0.1) as bar:
    def progress(n, total):
      bar.total = total
      bar.update(n)
    summary = latent_cache.cache_latents(
        args.sources, args.ckpt, args.out, batch_size=args.batch_size, repa=not args.no_repa, seed=args.seed,
        dtype=args.dtype, shard=args.shard, threads=args.threads, records_per_shard=args.records_per_shard,
        limit=args.limit, progress=progress)
  skipped = ", ".join(f"{r} {n}" for r, n in summary["skipped"].items()) or "none"
  print(f"wrote {summary['written']} of {summary['records_read']} records to {args.out} "
        f"({summary['shards']} shards, REPA {'on' if summary['repa'] else 'off'}); skipped: {skipped}")
  return summary


if __name__ == "__main__":
  main()
