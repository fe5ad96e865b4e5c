"""Input-pipeline throughput per CPU core at 384x384: ArrayRecord read + decode + preprocess + tokenise + pack.

  python bench/data.py                   # ~1 min; prints a table and a JSON line
  python bench/data.py --batches 20 --json bench_data.json

Builds a synthetic data set (JPEGs of 512x384 / 384x512 / 640x480 with smooth content, ~40-word
captions and answers, ~300-word documents), converts it with jfl-prepare, and runs the real pipeline
(config.data defaults, 4096-token rows, the 1.3B model's 384 px / 576 image tokens) in ONE process
with one reader thread per source. Throughput is divided by the process CPU time (all threads), so
"per core" means per CPU-second. Tokenisation uses the demo word-level tokenizer (the DeepSeek BPE is
not available offline; tokenising is a small part of the cost next to JPEG decoding and resizing).

Train-step reference (H100, 1.3B model, 45% MFU of 989 TFLOP/s bf16 dense): one 4096-token row costs
6 * 2.03e9 * 4096 FLOPs = 49.9 TFLOP -> 0.112 s per GPU. "cores/GPU" = CPU seconds to build one row
/ GPU seconds to train on it (the fraction of a train step one core spends on that step's data).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import janusflow_1_3b  # noqa: E402
from jfl.data import pipeline, prepare  # noqa: E402
from jfl.demo import shapes  # noqa: E402
from jfl.demo import tokenizer as demo_tok  # noqa: E402

N_PARAMS, MFU, PEAK = 2.03e9, 0.45, 989e12
MIXES = {"understanding": "0=1:0:0", "generation": "0=0:1:0", "text": "0=0:0:1", "paper 14:80:6": "0=14:80:6"}


def _image(rng, w, h) -> Image.Image:
  """Smooth random content (upsampled noise + gradient) so JPEG sizes resemble photos."""
  small = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), np.uint8)
  img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
  noise = rng.normal(0, 12, (h, w, 3))
  return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))


def make_data(d: str, n: int, seed: int = 0) -> dict[str, str]:
  """n images + captions, conversations and documents as jfl-prepare'd ArrayRecord shards."""
  rng = np.random.default_rng(seed)
  words = sorted({w for t in shapes.all_texts() for w in t.replace(".", " ").replace("?", " ").split()})
  sentence = lambda k: " ".join(rng.choice(words, k))
  pairs, convs, texts = [], [], []
  for i in range(n):
    w, h = ((512, 384), (384, 512), (640, 480))[i % 3]
    path = os.path.join(d, f"{i}.jpg")
    _image(rng, w, h).save(path, quality=90)
    pairs.append({"image": path, "caption": sentence(40)})
    convs.append({"image": path, "conversations": [{"from": "human", "value": "<image>\n" + sentence(15)},
                                                   {"from": "gpt", "value": sentence(40)}]})
    texts.append({"text": sentence(300)})
  out = {}
  for name, fmt, rows in (("gen", "pairs", pairs), ("und", "llava", convs), ("text", "text", texts)):
    with open(os.path.join(d, f"{name}.jsonl"), "w") as f:
      f.write("\n".join(json.dumps(r) for r in rows))
    prepare.prepare([f"{fmt}:{d}/{name}.jsonl"], os.path.join(d, f"{name}_ar"), verify_images=False)
    out[name] = f"arrayrecord:{d}/{name}_ar"
  return out


def measure(config, tok, batches: int) -> dict:
  it = pipeline.make_train_iterator(config, tok)
  next(it)  # warm-up: thread start, first reads
  c0, t0, cpu0 = it.counts(), time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  c1 = it.counts()
  it.close()
  ex = sum(c1[f"examples/{t}"] - c0[f"examples/{t}"] for t in ("und", "gen", "text"))
  tokens = c1["tokens"] - c0["tokens"]
  rows = batches * config.data.batch_size
  row_cpu = cpu / rows
  step_row = 6 * N_PARAMS * config.data.seq_len / (MFU * PEAK)
  return {"examples": ex, "examples_per_core_s": ex / cpu, "tokens_per_core_s": tokens / cpu,
          "rows_per_core_s": rows / cpu, "fill": tokens / (rows * config.data.seq_len), "cpu_s": cpu, "wall_s": wall,
          "step_s_per_row": step_row, "cores_per_gpu": row_cpu / step_row}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--images", type=int, default=96, help="distinct images in the synthetic set")
  ap.add_argument("--batches", type=int, default=20, help="timed batches per mix")
  ap.add_argument("--rows", type=int, default=8, help="rows (4096 tokens each) per batch")
  ap.add_argument("--json", help="also write the results here")
  args = ap.parse_args(argv)
  tok = demo_tok.build_tokenizer()
  results = {}
  with tempfile.TemporaryDirectory() as d:
    specs = make_data(d, args.images)
    for name, mix in MIXES.items():
      config = janusflow_1_3b.get_config()
      config.data = pipeline.default_data_config()
      config.data.update(und_sources=specs["und"], gen_sources=specs["gen"], text_sources=specs["text"],
                         mix_schedule=mix, batch_size=args.rows, read_threads=1, read_buffer_size=8, prefetch=0,
                         num_workers=0)
      results[name] = measure(config, tok, args.batches)
  print(f"{'mix':>14} {'ex/s/core':>10} {'tok/s/core':>11} {'rows/s/core':>12} {'fill':>6} {'cores/GPU':>10}")
  for name, r in results.items():
    print(f"{name:>14} {r['examples_per_core_s']:10.1f} {r['tokens_per_core_s']:11.0f} {r['rows_per_core_s']:12.2f} "
          f"{r['fill']:6.1%} {r['cores_per_gpu']:10.2f}")
  step = next(iter(results.values()))["step_s_per_row"]
  print(f"train step per 4096-token row on one H100 (45% MFU, N=2.03e9): {step:.3f} s")
  print(json.dumps(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
