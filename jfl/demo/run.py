"""jfl-demo: train a small JanusFlow from scratch on the shapes dataset, then draw and answer, and score.

  jfl-demo [--workdir out/demo] [--config.train.num_steps=1200 ...]

Writes to the workdir: the training run (checkpoints, TensorBoard logs, metrics.jsonl), `samples.png`
(generated images for held-out prompts, captions below each), `answers.txt` (held-out questions,
expected and given answers) and `scores.json`; prints one summary line.
"""

import argparse
import json
import os
import time

import numpy as np
from PIL import Image, ImageDraw

from jfl import chat, config_utils
from jfl.cli.common import friendly_errors
from jfl.demo import evaluate, shapes, tokenizer as demo_tokenizer

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "configs", "demo.py")


def held_out(n: int, seed: int = 1):
  """The first n examples of the held-out split (attribute combinations never seen in training)."""
  ds = shapes.ShapesDataset("test", seed=seed, num_examples=n)
  return [ds[i] for i in range(n)]


def score_understanding(pipe, examples) -> tuple[float, list[str]]:
  convs, expected = [], []
  for ex in examples:
    for question, answer in ex.conversations:
      convs.append(chat.conversation(Image.fromarray(ex.image), question))
      expected.append(answer)
  answers = []
  for i in range(0, len(convs), 32):
    answers += pipe.chat_batch(convs[i:i + 32], max_new_tokens=4)
  lines = [f"{c[0]['content']!r:34} expected {e:9} got {a!r}" for c, e, a in zip(convs, expected, answers)]
  return evaluate.score_answers(answers, expected), lines


def score_generation(pipe, examples, num_steps: int, cfg_weight: float):
  images = []
  for i in range(0, len(examples), 32):
    chunk = examples[i:i + 32]
    images += pipe.generate([ex.caption for ex in chunk], seed=1000 + i, num_steps=num_steps, cfg_weight=cfg_weight)
  arrays = [np.asarray(im) for im in images]
  return evaluate.score_generation(arrays, examples), arrays


def sample_grid(arrays, captions, path: str, cols: int = 6, scale: int = 3) -> None:
  """Generated images (upscaled) with their prompts underneath."""
  size = arrays[0].shape[0] * scale
  rows = -(-len(arrays) // cols)
  cell_w, cell_h = max(size, 150), size + 28
  grid = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
  draw = ImageDraw.Draw(grid)
  for k, (a, cap) in enumerate(zip(arrays, captions)):
    x, y = (k % cols) * cell_w, (k // cols) * cell_h
    grid.paste(Image.fromarray(a).resize((size, size), Image.NEAREST), (x + (cell_w - size) // 2, y))
    words = cap.split()
    draw.text((x + 2, y + size + 1), " ".join(words[:3]), fill="black")
    draw.text((x + 2, y + size + 13), " ".join(words[3:]), fill="black")
  grid.save(path)


def score(pipe, examples, config) -> tuple[dict, list[str], list[np.ndarray]]:
  """Held-out scores of `pipe`: (scores, answer lines, generated images)."""
  und_acc, lines = score_understanding(pipe, examples)
  gen, arrays = score_generation(pipe, examples, config.eval.num_steps, config.eval.cfg_weight)
  scores = {"understanding_acc": und_acc, "colour_acc": gen["colour_acc"], "position_acc": gen["position_acc"],
            "shape_acc": gen.get("shape_acc"), "held_out_examples": len(examples)}
  return scores, lines, arrays


def curve_eval(config, workdir: str):
  """The loop's eval hook: scores the EMA weights on `demo.curve_examples` held-out examples and appends
  {"step", scores...} to workdir/curves.jsonl (one pipeline, so nothing recompiles between calls)."""
  from jfl import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  from jfl.pipeline import JanusFlowPipeline  # pylint: disable=g-import-not-at-top
  from jfl.train import loop  # pylint: disable=g-import-not-at-top
  examples = held_out(config.demo.curve_examples)
  tokenizer = tok_lib.load_tokenizer(config.data.tokenizer)
  pipe = None

  def eval_fn(step: int, model_params, vae_params):
    nonlocal pipe
    if pipe is None:
      pipe = JanusFlowPipeline(loop.model_config(config), model_params, vae_params, tokenizer)
    pipe.params = model_params
    scores, _, _ = score(pipe, examples, config)
    with open(os.path.join(workdir, "curves.jsonl"), "a") as f:
      f.write(json.dumps({"step": step, **scores}) + "\n")
    print(f"\nstep {step}: understanding {scores['understanding_acc']:.1%} | generation colour "
          f"{scores['colour_acc']:.1%} position {scores['position_acc']:.1%} ({len(examples)} held-out)", flush=True)
  return eval_fn


def evaluate_run(export_dir: str, workdir: str, config) -> dict:
  from jfl.pipeline import JanusFlowPipeline  # pylint: disable=g-import-not-at-top
  pipe = JanusFlowPipeline.from_pretrained(export_dir)
  examples = held_out(config.demo.eval_examples)
  scores, lines, arrays = score(pipe, examples, config)
  k = config.demo.grid_examples
  sample_grid(arrays[:k], [ex.caption for ex in examples[:k]], os.path.join(workdir, "samples.png"))
  with open(os.path.join(workdir, "answers.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(workdir, "scores.json"), "w") as f:
    json.dump(scores, f, indent=2)
  return scores


def run(workdir: str, overrides: list[str]) -> dict:
  from jfl.train import loop  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  tok_dir = os.path.join(workdir, "tokenizer")
  demo_tokenizer.build_tokenizer(tok_dir)
  config = config_utils.load_config(DEMO_CONFIG, [f"--config.data.tokenizer={tok_dir}", *overrides])
  start = time.time()
  loop.train(config, workdir, eval_fn=curve_eval(config, workdir) if config.eval.every else None)
  train_s = time.time() - start
  export_dir = os.path.join(workdir, "export")
  demo_tokenizer.build_tokenizer(export_dir)
  scores = evaluate_run(export_dir, workdir, config)
  scores["train_seconds"] = round(train_s, 1)
  print(f"jfl-demo: understanding {scores['understanding_acc']:.1%} | generation colour {scores['colour_acc']:.1%}"
        f" position {scores['position_acc']:.1%} | {scores['held_out_examples']} held-out examples, "
        f"trained {train_s / 60:.1f} min | {workdir}/samples.png")
  return scores


@friendly_errors("jfl-demo")
def main(argv=None):
  ap = argparse.ArgumentParser(prog="jfl-demo", description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="out/demo", help="where the run and its results go")
  args, rest = ap.parse_known_args(argv)
  _, overrides = config_utils.split_config_args(rest)
  unknown = [a for a in rest if a not in overrides]
  if unknown:
    raise ValueError(f"unknown argument {unknown[0]!r}")
  run(args.workdir, overrides)
