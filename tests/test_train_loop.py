"""The training loop: SIGTERM + resume equals an uninterrupted run, corrupt checkpoints, NaN stop, CLI."""

import glob
import logging
import os
import signal

import jax
import numpy as np
import pytest

from jfl import checkpoint as converted
from jfl.cli import train as cli
from jfl.config_utils import load_config
from jfl.data import synthetic
from jfl.train import loop
from tests.test_train_step import _params, fast_compile  # noqa: F401  (fixture)

STEPS = 6
OVERRIDES = [f"--config.train.num_steps={STEPS}", "--config.train.log_every=1", "--config.checkpoint.every=3",
             "--config.checkpoint.keep=2", "--config.data.seq_len=192", "--config.data.cached_latents=True"]


def _config(*extra):
  return load_config("configs/train_tiny.py", OVERRIDES + list(extra))


def _losses(history, steps):
  return np.array([[history[s][k] for k in ("loss", "ar_loss", "rf_loss", "repa_loss")] for s in steps])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run_a"))
  return workdir, loop.train(_config(), workdir)


@pytest.fixture(scope="module")
def preempted_then_resumed(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run_b"))

  def sigterm_at_2(step, _):
    if step == 2:
      signal.raise_signal(signal.SIGTERM)

  first = loop.train(_config(), workdir, step_callback=sigterm_at_2)
  second = loop.train(_config(), workdir)
  return workdir, first, second


def test_sigterm_saves_and_resume_equals_uninterrupted(uninterrupted, preempted_then_resumed):
  _, a = uninterrupted
  workdir, b1, b2 = preempted_then_resumed
  assert a["status"] == "done" and sorted(a["history"]) == list(range(1, STEPS + 1))
  # SIGTERM arrives while step 3 runs (metrics are read one step late): checkpoint 3, then exit.
  assert b1["status"] == "preempted" and int(b1["state"].step) == 3
  assert sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*"))) == [3, 6]
  assert b2["status"] == "done" and sorted(b2["history"]) == [4, 5, 6]
  np.testing.assert_array_equal(_losses(b1["history"], [1, 2, 3]), _losses(a["history"], [1, 2, 3]))
  np.testing.assert_allclose(_losses(b2["history"], [4, 5, 6]), _losses(a["history"], [4, 5, 6]), rtol=1e-6)
  for x, y in zip(jax.tree.leaves(jax.device_get(a["state"])), jax.tree.leaves(jax.device_get(b2["state"]))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert all(np.isfinite(m["loss"]) and m["skipped"] == 0 for m in a["history"].values())


def test_export_holds_the_ema_weights(uninterrupted):
  workdir, a = uninterrupted
  cfg, params, vae_params = converted.load_converted(os.path.join(workdir, "export"))
  assert cfg == loop.model_config(_config()) and vae_params is None  # cached latents: no VAE needed
  ema = jax.device_get(a["state"].ema_params["model"])
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(x, y)
  assert not all(np.array_equal(x, y) for x, y in
                 zip(jax.tree.leaves(ema), jax.tree.leaves(jax.device_get(a["state"].params["model"]))))
  assert os.path.isfile(os.path.join(workdir, "metrics.jsonl")) and glob.glob(os.path.join(workdir, "tb", "events*"))


def test_init_from_an_export_with_reinitialised_parts(uninterrupted, tmp_path):
  workdir, a = uninterrupted
  export = os.path.join(workdir, "export")
  r = loop.train(_config(f"--config.init_from={export}", "--config.init_reinit=model/gen_enc",
                         "--config.train.num_steps=0"), str(tmp_path))
  params = jax.device_get(r["state"].params)
  ema = jax.device_get(a["state"].ema_params)
  for group in ("llm", "siglip", "gen_dec", "und_aligner"):
    for x, y in zip(jax.tree.leaves(params["model"][group]), jax.tree.leaves(ema["model"][group])):
      np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(params["repa"]), jax.tree.leaves(ema["repa"])):
    np.testing.assert_array_equal(x, y)  # the export carries the REPA projector too
  assert not any(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(params["model"]["gen_enc"]),
                                                       jax.tree.leaves(ema["model"]["gen_enc"])) if np.std(y) > 0)
  assert int(r["state"].step) == 0
  with pytest.raises(ValueError, match="not a jfl-convert directory"):
    loop.train(_config(f"--config.init_from={tmp_path}"), str(tmp_path / "x"))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(uninterrupted, preempted_then_resumed, caplog):
  _, a = uninterrupted
  workdir, _, _ = preempted_then_resumed
  latest = os.path.join(workdir, "checkpoints", "6")
  for f in glob.glob(os.path.join(latest, "state", "**", "*"), recursive=True):
    if os.path.isfile(f):
      with open(f, "wb") as fh:
        fh.write(b"garbage")
  with caplog.at_level(logging.WARNING, logger="jfl.train"):
    c = loop.train(_config(), workdir)
  assert "step 6 is unreadable" in caplog.text
  assert sorted(c["history"]) == [4, 5, 6] and glob.glob(latest + ".unreadable-*")
  np.testing.assert_allclose(_losses(c["history"], [4, 5, 6]), _losses(a["history"], [4, 5, 6]), rtol=1e-6)


def test_nonfinite_losses_in_a_row_stop_the_run(tmp_path, monkeypatch):
  real = synthetic.synthetic_rows

  def nan_images(*args, **kwargs):
    out = real(*args, **kwargs)
    out["und_images"][:] = np.nan
    return out

  monkeypatch.setattr(synthetic, "synthetic_rows", nan_images)
  r = loop.train(_config("--config.train.max_bad_steps=2"), str(tmp_path))
  assert r["status"] == "diverged"
  assert [r["history"][s]["bad_steps"] for s in sorted(r["history"])] == [1, 2]
  assert int(r["state"].skipped) >= 2 and not os.path.isdir(os.path.join(tmp_path, "export"))
  # No update was applied: the EMA (which would lag behind any update) still equals the params.
  state = jax.device_get(r["state"])
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(x, y)


def test_eval_hook_writes_samples_and_answers(uninterrupted, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from jfl.demo import shapes, tokenizer as demo_tok  # pylint: disable=g-import-not-at-top
  from jfl.train import evaluate  # pylint: disable=g-import-not-at-top
  _, a = uninterrupted
  tok = demo_tok.build_tokenizer(str(tmp_path / "tok"))
  Image.fromarray(shapes.render("circle", "red", "left")).save(tmp_path / "q.png")
  config = _config(f"--config.eval.questions={tmp_path / 'q.png'}|What shape is this?")
  cfg = loop.model_config(config)
  vae = _params()[1]
  params = jax.device_get(a["state"].ema_params["model"])
  assert evaluate.Evaluator(config, cfg, None, str(tmp_path / "eval"))(7, params, vae) is None  # no tokenizer
  out = evaluate.Evaluator(config, cfg, tok, str(tmp_path / "eval"))(7, params, vae)
  with Image.open(out["images"]) as grid:
    assert grid.size == (2 * cfg.image_size, cfg.image_size)  # one image per prompt
  assert len(out["answers"]) == 1
  with open(tmp_path / "eval" / "answers_00000007.txt") as f:
    assert "What shape is this?" in f.read()


def test_cli_reports_bad_configs_in_one_line(tmp_path, capsys):
  for bad, msg in (("--config.optim.nope=1", "unknown config field config.optim.nope"),
                   ("--config.optim.frozen=model/nothing", "matches no parameter"),
                   ("--config.data.batch_size=3", "must be a multiple of 8")):
    with pytest.raises(SystemExit) as e:
      cli.main(["--config", "configs/train_tiny.py", "--workdir", str(tmp_path), bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jfl-train: error:") and msg in err, err
