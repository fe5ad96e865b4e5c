"""Learning curves of demo runs as PNG: each loss against steps, one line per run.

  python -m jfl.demo.report out/demo out/demo_no_repa --labels "REPA,no REPA" --out docs/demo_losses.png
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = (("ar_loss", "AR (understanding + text)"), ("rf_loss", "rectified flow"), ("repa_loss", "REPA"))


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file (is {workdir} a demo/training workdir?)")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_losses(runs: dict[str, list[dict]], out: str) -> None:
  fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
  for ax, (key, title) in zip(axes, CURVES):
    for label, rows in runs.items():
      pts = [(r["step"], r[key]) for r in rows if key in r]
      if pts:
        ax.plot(*zip(*pts), label=label)
    ax.set(title=title, xlabel="step")
    ax.grid(alpha=0.3)
  axes[0].legend()
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
  plot_losses({l: read_metrics(w) for l, w in zip(labels, args.workdirs)}, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
