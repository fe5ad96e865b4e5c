"""The training input pipeline: packed batch layout and masks, skips, mixing schedule, resume, host sharding."""

import json

import grain
import jax
import numpy as np
from PIL import Image
import pytest

from configs import tiny
from jfl import batch as batch_lib
from jfl import processor
from jfl.data import pipeline
from jfl.demo import tokenizer as T

P = 64  # JanusFlowConfig.tiny().num_image_tokens
WORDS = ("red", "blue", "green", "circle", "square")


def _png(path, colour: int, w: int, h: int):
  Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(path)
  return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Understanding (8 good + 4 bad, bad ones first), generation (12 good + 1 empty caption), text (6)."""
  d = tmp_path_factory.mktemp("pipeline_data")
  tok = T.build_tokenizer(str(d / "tok"))
  und = []
  jpg = d / "trunc.jpg"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(jpg, quality=90)
  jpg.write_bytes(jpg.read_bytes()[:300])
  q = "<image>\nWhat colour is the shape?"
  conv = lambda img, a: {"image": img, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
  und += [conv("trunc.jpg", "red"), conv("missing.png", "red"), conv("u0.png", " ".join(["red"] * 300)),
          {"image": "u0.png", "conversations": [{"from": "human", "value": q}]}]
  for i in range(8):
    _png(d / f"u{i}.png", 10 + i, 40 if i % 2 else 24, 24 if i % 2 else 40)
    und.append(conv(f"u{i}.png", WORDS[i % 5]))
  (d / "und.json").write_text(json.dumps(und))
  gen = [{"image": "g0.png", "caption": "  "}]
  for i in range(12):
    gen.append({"image": _png(d / f"g{i}.png", 100 + i, 48, 36), "caption": f"a {WORDS[i % 5]} circle"})
  (d / "gen.jsonl").write_text("\n".join(json.dumps(g) for g in gen))
  (d / "text.jsonl").write_text("\n".join(json.dumps({"text": f"a {w} square is {w}."}) for w in WORDS + ("red",)))
  return d, tok


def _config(d, **data):
  cfg = tiny.get_config()
  cfg.data = pipeline.default_data_config()
  cfg.data.update(und_sources=f"llava:{d}/und.json", gen_sources=f"pairs:{d}/gen.jsonl",
                  text_sources=f"text:{d}/text.jsonl", seq_len=256, batch_size=4, read_threads=2, prefetch=2)
  cfg.data.update(data)
  return cfg


def _segments(batch, r):
  seg = batch["segment_ids"][r]
  return [np.flatnonzero(seg == s) for s in range(1, seg.max() + 1)]


def _ids(tok, *tokens):
  return [tok.convert_tokens_to_ids(t) for t in tokens]


def test_packed_batch_layout_masks_and_images(data):
  d, tok = data
  cfg = _config(d)
  it = pipeline.make_train_iterator(cfg, tok)
  bos, eos, boi, eoi, img = _ids(tok, T.BOS, T.EOS, T.BOI, T.EOI, T.IMAGE_TAG)
  want = {k: (v.shape, v.dtype) for k, v in pipeline.batch_spec(cfg, batch_size=4).items()}
  colours_und = {10 + i: processor.understanding_image(Image.open(d / f"u{i}.png").convert("RGB"), 32)
                 for i in range(8)}
  seen = set()
  for _ in range(4):
    b = next(it)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in b.items()} == want
    batch_lib.check_batch(b, P)
    for r in range(4):
      und_k = gen_k = 0
      for pos in _segments(b, r):
        toks, tgt, lm = b["tokens"][r, pos], b["targets"][r, pos], b["loss_mask"][r, pos]
        task = set(b["task"][r, pos])
        assert len(task) == 1 and toks[0] == bos
        np.testing.assert_array_equal(b["positions"][r, pos], np.arange(len(pos)))
        np.testing.assert_array_equal(tgt[:-1], toks[1:])
        assert lm[-1] == 0
        task = task.pop()
        seen.add(task)
        if task == batch_lib.TASK_UND:
          # [BOS, system..., User, :, BOI, 64 x IMG, EOI, \n, question..., Assistant, :, answer, EOS]
          start = int(np.flatnonzero(toks == boi)[0])
          assert toks[start + P + 1] == eoi and np.all(toks[start + 1:start + P + 1] == img)
          slot = b["und_slot_mask"][r, pos]
          np.testing.assert_array_equal(np.flatnonzero(slot), np.arange(start, start + P + 1))
          answer = tgt[lm == 1]
          assert len(answer) == 2 and answer[1] == eos and toks[-1] == eos
          assert tok.convert_ids_to_tokens(int(answer[0])) in WORDS
          assert b["und_valid"][r, und_k]
          pix = b["und_images"][r, und_k]
          colour = int(round((pix[16, 16, 0] * 0.5 + 0.5) * 255))
          np.testing.assert_array_equal(pix, colours_und[colour])
          und_k += 1
        elif task == batch_lib.TASK_GEN:
          n = len(pos) - P - 1
          assert np.all(lm == 0) and toks[n] == boi and np.all(toks[n + 1:] == img)
          np.testing.assert_array_equal(b["gen_slot_mask"][r, pos], np.arange(len(pos)) >= n)
          np.testing.assert_array_equal(b["gen_prompt_slot"][r, pos],
                                        np.where((np.arange(len(pos)) > 0) & (np.arange(len(pos)) < n), gen_k, -1))
          pix = b["gen_images"][r, gen_k]
          assert b["gen_valid"][r, gen_k] and 100 <= int(round((pix[0, 0, 0] * 0.5 + 0.5) * 255)) < 112
          assert np.ptp(pix) == 0  # a uniform image stays uniform through resize + crop
          gen_k += 1
        else:
          # BOS + sentence + EOS, loss on every next token
          assert toks[-1] == eos and np.all(lm[:-1] == 1)
      assert b["und_valid"][r].sum() == und_k and b["gen_valid"][r].sum() == gen_k
      assert not b["und_images"][r, und_k:].any() and not b["gen_images"][r, gen_k:].any()
      pad = b["segment_ids"][r] == 0
      assert np.all(b["loss_mask"][r, pad] == 0) and np.all(b["task"][r, pad] == 0)
  assert seen == {batch_lib.TASK_UND, batch_lib.TASK_GEN, batch_lib.TASK_TEXT}


def test_bad_records_are_skipped_and_counted(data):
  d, tok = data
  cfg = _config(d, mix_schedule="0=1:0:0", shuffle=False, batch_size=2)
  it = pipeline.make_train_iterator(cfg, tok)
  next(it)
  counts = it.skip_counts()
  assert 0 < it.counts()["examples/und"] < 8  # still in the first epoch
  assert {k: v for k, v in counts.items() if v} == {"bad_image": 1, "missing_image": 1, "too_long": 1,
                                                     "empty_response": 1}
  cfg = _config(d, mix_schedule="0=0:1:0", shuffle=False, batch_size=2)
  it = pipeline.make_train_iterator(cfg, tok)
  next(it)
  assert {k: v for k, v in it.skip_counts().items() if v} == {"empty_caption": 1}


def test_mixing_ratios_follow_the_schedule(data):
  d, tok = data
  cfg = _config(d, mix_schedule="0=30:50:20,8=10:20:70", seq_len=2048, batch_size=4, prefetch=0,
                shuffle=False)
  it = pipeline.make_train_iterator(cfg, tok)
  phases = []
  for _ in range(2):
    before = it.counts()
    for _ in range(8):
      next(it)
    after = it.counts()
    phases.append(np.array([after[f"examples/{t}"] - before.get(f"examples/{t}", 0) for t in ("und", "gen", "text")]))
  for got, want in zip(phases, ([.3, .5, .2], [.1, .2, .7])):
    n, want = got.sum(), np.array(want)
    assert n > 300
    z = (got / n - want) / np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(z) < 4), (got, n, z)


def test_resume_from_state_gives_the_same_batches(data, tmp_path):
  d, tok = data
  cfg = _config(d)
  it = pipeline.make_train_iterator(cfg, tok)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  grain.checkpoint.CheckpointHandler().save(tmp_path, item=it)
  expected = [next(it) for _ in range(3)]
  counts = it.counts()
  for restore in (lambda i: i.set_state(state), lambda i: grain.checkpoint.CheckpointHandler().restore(tmp_path, i)):
    it2 = pipeline.make_train_iterator(cfg, tok)
    restore(it2)
    for want in expected:
      got = next(it2)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert it2.counts() == counts
    it2.close()
  it.close()


def test_worker_processes_resume_and_follow_the_schedule(data):
  d, tok = data
  cfg = _config(d, num_workers=2, mix_schedule="0=30:50:20,3=0:1:0")
  it = pipeline.make_train_iterator(cfg, tok)
  first = [next(it) for _ in range(4)]
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  # Worker w of W emits global steps w, w + W, ...: the schedule switches to generation-only at step 3;
  # each worker's first batch after the switch may still hold the one example it drew before.
  starts = lambda b: b["task"][(b["positions"] == 0) & (b["segment_ids"] > 0)]
  assert all(np.isin(starts(b), [1, 3]).any() for b in first[:3])
  assert all(np.isin(starts(b), [1, 3]).sum() <= 1 for b in (first[3], expected[0]))
  assert np.all(starts(expected[1]) == 2)
  it2 = pipeline.make_train_iterator(cfg, tok)
  it2.set_state(state)
  for want in expected:
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  it.close()
  it2.close()


def test_processes_read_disjoint_shards(data):
  d, tok = data
  colours = []
  for proc in range(2):
    cfg = _config(d, mix_schedule="0=0:1:0", batch_size=4)
    it = pipeline.make_train_iterator(cfg, tok, process_index=proc, process_count=2)
    seen = set()
    for _ in range(3):
      b = next(it)
      assert b["tokens"].shape == (2, 256)
      pix = b["gen_images"][b["gen_valid"]]
      seen |= {int(round((p[0, 0, 0] * 0.5 + 0.5) * 255)) for p in pix}
    colours.append(seen)
  assert not colours[0] & colours[1]
  assert colours[0] | colours[1] == set(range(100, 112))


def test_config_errors_name_the_problem(data):
  d, tok = data
  with pytest.raises(ValueError, match="no text sources"):
    pipeline.make_train_iterator(_config(d, text_sources=""), tok)
  with pytest.raises(ValueError, match="mix schedule"):
    pipeline.make_train_iterator(_config(d, mix_schedule="30:50:20"), tok)
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.make_train_iterator(_config(d), tok, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="unknown option"):
    pipeline.make_train_iterator(_config(d, gen_sources=f"pairs:{d}/gen.jsonl?caption=x"), tok)


def test_global_batch_from_process_local_data(data):
  d, tok = data
  cfg = _config(d, batch_size=8)
  it = pipeline.make_train_iterator(cfg, tok)
  local = next(it)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  glob = pipeline.make_global_batch(local, sharding)
  spec = pipeline.batch_spec(cfg)
  assert {k: (v.shape, v.dtype) for k, v in glob.items()} == {k: (v.shape, v.dtype) for k, v in spec.items()}
  np.testing.assert_array_equal(np.asarray(glob["tokens"]), local["tokens"])
  assert glob["und_images"].sharding == sharding
  it.close()
