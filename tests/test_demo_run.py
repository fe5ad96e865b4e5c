"""The main job, shortened: jfl-demo trains the demo config for a few steps, then samples, answers and scores."""

import json
import os

from PIL import Image

from jfl.demo import report, run as demo


def test_demo_runs_end_to_end(tmp_path, capsys):
  # 8 rows: the tests run on 8 simulated devices (the batch must split over them).
  scores = demo.run(str(tmp_path), ["--config.train.num_steps=4", "--config.train.log_every=2",
                                    "--config.data.batch_size=8", "--config.demo.eval_examples=4",
                                    "--config.demo.grid_examples=4", "--config.eval.num_steps=2",
                                    "--config.checkpoint.every=2",
                                    "--config.eval.every=2", "--config.demo.curve_examples=2"])
  for key in ("understanding_acc", "colour_acc", "position_acc"):
    assert 0.0 <= scores[key] <= 1.0
  assert json.loads((tmp_path / "scores.json").read_text())["held_out_examples"] == 4
  assert len((tmp_path / "answers.txt").read_text().splitlines()) == 4 * 3  # three questions per image
  assert Image.open(tmp_path / "samples.png").size[0] > 0
  assert os.path.isdir(tmp_path / "export")
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {"ar_loss", "rf_loss", "repa_loss"} <= set(lines[-1]) and lines[-1]["step"] == 4
  assert "jfl-demo: understanding" in capsys.readouterr().out
  curves = [json.loads(l) for l in (tmp_path / "curves.jsonl").read_text().splitlines()]
  assert [c["step"] for c in curves] == [2, 4] and all(c["held_out_examples"] == 2 for c in curves)
  report.main([str(tmp_path), "--out", str(tmp_path / "curves.png")])
  assert Image.open(tmp_path / "curves.png").size[0] > 0
