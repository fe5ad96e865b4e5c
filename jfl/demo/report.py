"""Learning curves of demo runs as PNG: each loss and each held-out accuracy against steps, one line per run.

  python -m jfl.demo.report out/demo out/demo_no_repa --labels "REPA,no REPA" --out docs/demo_curves.png

Losses come from workdir/metrics.jsonl; accuracies from workdir/curves.jsonl, written when the demo
ran with periodic scoring (`jfl-demo --config.eval.every=N`).
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSSES = (("ar_loss", "AR loss (understanding + text)"), ("rf_loss", "rectified-flow loss"),
          ("repa_loss", "REPA loss (-cosine)"))
# A loss is only plotted at steps whose batch had tokens/examples for it (a schedule can leave a task out).
SUPPORT = {"ar_loss": ("und_tokens", "text_tokens"), "rf_loss": ("gen_examples",), "repa_loss": ("gen_examples",)}
ACCURACIES = (("understanding_acc", "understanding accuracy"), ("colour_acc", "generation colour accuracy"),
              ("position_acc", "generation position accuracy"))


def read_jsonl(workdir: str, name: str, required: bool = True) -> list[dict]:
  path = os.path.join(workdir, name)
  if not os.path.isfile(path):
    if required:
      raise ValueError(f"{path}: no such file (is {workdir} a demo/training workdir?)")
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(runs: dict[str, tuple[list[dict], list[dict]]], out: str) -> None:
  """runs: label -> (metrics rows, accuracy rows). One panel per loss, then one per accuracy if any."""
  panels = [(0, k, t) for k, t in LOSSES]
  if any(acc for _, acc in runs.values()):
    panels += [(1, k, t) for k, t in ACCURACIES]
  cols = len(LOSSES)
  fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(5 * cols, 3.6 * (-(-len(panels) // cols))),
                           squeeze=False)
  for ax, (source, key, title) in zip(axes.flat, panels):
    for label, rows in runs.items():
      pts = [(r["step"], r[key]) for r in rows[source]
             if r.get(key) is not None and (source or sum(r.get(c, 1) for c in SUPPORT[key]) > 0)]
      if pts:
        ax.plot(*zip(*pts), marker="o" if source else None, markersize=3, label=label)
    ax.set(title=title, xlabel="step")
    if source:
      ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
  axes.flat[0].legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("workdirs", nargs="+")
  ap.add_argument("--labels", help="comma-separated run labels (default: the directory names)")
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  labels = args.labels.split(",") if args.labels else [os.path.basename(w.rstrip("/")) for w in args.workdirs]
  if len(labels) != len(args.workdirs):
    raise ValueError(f"{len(labels)} labels for {len(args.workdirs)} runs")
  runs = {l: (read_jsonl(w, "metrics.jsonl"), read_jsonl(w, "curves.jsonl", required=False))
          for l, w in zip(labels, args.workdirs)}
  plot_curves(runs, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
