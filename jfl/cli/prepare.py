"""jfl-prepare: convert LLaVA JSON, caption JSONL/Parquet, WebDataset tars, TFDS or text JSONL to ArrayRecord.

  jfl-prepare "llava:/data/llava_v1_5_mix665k.json?image_root=/data/images" --out /data/prepared/llava
  jfl-prepare "pairs:/data/captions.parquet" --out /data/prepared/captions
  jfl-prepare "tfds:coco_captions?data_dir=/data/tfds&caption_key=captions/text" --out /data/prepared/coco
  jfl-prepare "text:/data/text/*.jsonl" --out /data/prepared/text --no-verify-images

Source specs: see jfl/data/sources.py. Then point the training config at the output:
  --config.data.und_sources=arrayrecord:/data/prepared/llava
"""

import argparse

from tqdm import tqdm

from jfl.cli.common import friendly_errors
from jfl.data import prepare as prepare_lib


@friendly_errors("jfl-prepare")
def main(argv=None):
  ap = argparse.ArgumentParser(prog="jfl-prepare", description=__doc__.splitlines()[0])
  ap.add_argument("sources", nargs="+", help="source specs FORMAT:PATH[?key=value&...]")
  ap.add_argument("--out", required=True, help="output directory (must not hold shards yet)")
  ap.add_argument("--records-per-shard", type=int, default=10000)
  ap.add_argument("--threads", type=int, default=8, help="reader threads")
  ap.add_argument("--no-verify-images", action="store_true", help="do not decode images to check them")
  ap.add_argument("--limit", type=int, default=None, help="convert at most this many records")
  args = ap.parse_args(argv)
  with tqdm(desc="records", unit="rec", smoothing=0.1) as bar:
    def progress(n, total):
      bar.total = total
      bar.update(n)
    summary = prepare_lib.prepare(args.sources, args.out, records_per_shard=args.records_per_shard,
                                  verify_images=not args.no_verify_images, threads=args.threads,
                                  limit=args.limit, progress=progress)
  skipped = ", ".join(f"{r} {n}" for r, n in summary["skipped"].items()) or "none"
  print(f"wrote {summary['written']} of {summary['records_read']} records to {args.out} "
        f"({summary['shards']} shards; {', '.join(f'{k} {v}' for k, v in summary['kinds'].items())}); "
        f"skipped: {skipped}")
  return summary


if __name__ == "__main__":
  main()
