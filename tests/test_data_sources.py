"""Data sources (LLaVA JSON/JSONL, pairs JSONL/Parquet, WebDataset, TFDS, text), jfl-prepare,
jfl-cache-latents, and the reference image preprocessing."""

import io
import json
import os
import tarfile

import flax.linen as nn
import jax
import numpy as np
from PIL import Image
import pytest

from configs import tiny
from jfl import checkpoint, processor
from jfl import tokenizer as tok_lib
from jfl.cli import cache_latents as cache_cli
from jfl.cli import prepare as prepare_cli
from jfl.data import pipeline, records, sources
from jfl.demo import tokenizer as T
from jfl.models import siglip as siglip_lib
from jfl.models import vae as vae_lib
from jfl.models.config import JanusFlowConfig


def _encoded(colour, w=12, h=8, fmt="PNG") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(buf, fmt)
  return buf.getvalue()


def _all(src):
  return [src[i] for i in range(len(src))]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("sources")
  (d / "a.png").write_bytes(_encoded(10))
  (d / "b.jpg").write_bytes(_encoded(200, 16, 16, "JPEG"))
  (d / "trunc.jpg").write_bytes(_encoded(50, 64, 64, "JPEG")[:200])
  return d


# ----------------------------------------------------------------------------- sources


def test_spec_errors_name_the_problem(files):
  for spec, msg in (("csv:/x", "FORMAT one of"), ("pairs:", "empty path"), (f"text:{files}/*.jsonl?foo=1", "unknown"),
                    (f"pairs:{files}/none*.jsonl", "no jsonl/json/parquet files"),
                    (f"text:{files}/x.jsonl?weight=-1", "weight"), ("tfds:coco", "data_dir")):
    with pytest.raises(ValueError, match=msg):
      sources.spec_weight(spec)
      sources.open_source(spec)


def test_llava_json_and_jsonl(files):
  rows = [
      {"image": "a.png", "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "<image>\nQ?"},
                                           {"from": "gpt", "value": "red"}]},
      {"images": ["a.png", "/abs/b.png"], "messages": [{"role": "user", "content": "x"},
                                                       {"role": "assistant", "content": "y"}]},
      {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
      {"conversations": [{"from": "robot", "value": "hi"}]},
      {"conversations": "nope"},
  ]
  (files / "llava.json").write_text(json.dumps(rows))
  (files / "llava.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n{not json\n")
  want = [
      records.conversation([str(files / "a.png")], [{"role": "User", "content": f"{tok_lib.IMAGE}\nQ?"},
                                                    {"role": "Assistant", "content": "red"}]),
      records.conversation([str(files / "a.png"), "/abs/b.png"], [{"role": "User", "content": "x"},
                                                                  {"role": "Assistant", "content": "y"}]),
      records.conversation([], [{"role": "User", "content": "hi"}, {"role": "Assistant", "content": "yo"}]),
      records.skip("bad_conversation"), records.skip("bad_record")]
  assert _all(sources.open_source(f"llava:{files}/llava.json")) == want
  jsonl = _all(sources.open_source(f"llava:{files}/llava.jsonl?image_root={files}"))
  assert jsonl == want + [records.skip("bad_record")]  # the malformed last line


def test_pairs_jsonl_and_parquet(files):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  (files / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in (
      {"image": "a.png", "caption": "c0"}, {"image_path": "/x/b.png", "text": "c1"}, {"caption": "no image"})))
  assert _all(sources.open_source(f"pairs:{files}/pairs.jsonl")) == [
      records.pair(str(files / "a.png"), "c0"), records.pair("/x/b.png", "c1"), records.skip("bad_record")]
  table = pa.table({"img": [{"bytes": _encoded(i), "path": None} for i in range(5)],
                    "txt": [f"caption {i}" for i in range(5)]})
  pq.write_table(table, files / "pairs.parquet", row_group_size=2)
  src = sources.open_source(f"pairs:{files}/pairs.parquet?image_key=img&caption_key=txt")
  assert _all(src) == [records.pair(_encoded(i), f"caption {i}") for i in range(5)]
  assert src[3] == records.pair(_encoded(3), "caption 3")  # random access across row groups


def test_webdataset_tar_shards(files):
  members = {"s/000.jpg": _encoded(1, fmt="JPEG"), "s/000.txt": b"first caption",
             "s/001.png": _encoded(2), "s/001.json": json.dumps({"caption": "second"}).encode(),
             "s/002.txt": b"no image"}
  with tarfile.open(files / "shard-0.tar", "w") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  src = sources.open_source(f"wds:{files}/shard-*.tar")
  assert _all(src) == [records.pair(members["s/000.jpg"], "first caption"),
                       records.pair(members["s/001.png"], "second"), records.skip("bad_record")]


def test_tfds_data_source_without_tensorflow(files):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class JflTinyCaptions(tfds.core.GeneratorBasedBuilder):
    """Images must be given encoded (PNG bytes): encoding numpy arrays would need TensorFlow."""
    VERSION = tfds.core.Version("1.0.0")
    # A one-part module name keeps tfds from resolving the class's package resources, which needs the
    # `importlib_resources` backport (not installed); only the builder side is affected, not data_source.
    __module__ = "jfl_tiny_captions_builder"

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(4):
        yield i, {"image": _encoded(30 * i), "captions": {"text": [f"caption {i}", "other"]}}

  JflTinyCaptions(data_dir=str(files / "tfds"), file_format="array_record").download_and_prepare()
  src = sources.open_source(f"tfds:jfl_tiny_captions?data_dir={files}/tfds&caption_key=captions/text")
  got = sorted(((r["caption"], r["image"]) for r in _all(src)))
  assert got == [(f"caption {i}", _encoded(30 * i)) for i in range(4)]
  with pytest.raises(ValueError, match="not found"):
    sources.open_source(f"tfds:jfl_tiny_captions?data_dir={files}/tfds&split=validation")


def test_text_jsonl(files):
  (files / "text.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n{"text": 3}\n')
  assert _all(sources.open_source(f"text:{files}/text.jsonl")) == [
      records.text("one"), records.skip("bad_record"), records.skip("bad_record")]
  assert sources.open_source(f"text:{files}/text.jsonl?text_key=body")[1] == records.text("two")


# ----------------------------------------------------------------------------- jfl-prepare


def test_prepare_writes_arrayrecord_and_counts_skips(files, capsys):
  (files / "prep.jsonl").write_text("\n".join(json.dumps(r) for r in (
      {"image": "a.png", "caption": "good one"}, {"image": "trunc.jpg", "caption": "truncated"},
      {"image": "missing.png", "caption": "missing"}, {"image": "b.jpg", "caption": " "},
      {"image": "b.jpg", "caption": "good two"})))
  out = files / "prepared"
  summary = prepare_cli.main([f"pairs:{files}/prep.jsonl", "--out", str(out), "--records-per-shard", "1"])
  assert summary["written"] == 2 and summary["records_read"] == 5 and summary["shards"] == 2
  assert summary["skipped"] == {"missing_image": 1, "bad_image": 1, "empty_caption": 1}
  assert json.loads((out / "summary.json").read_text()) == summary
  assert "wrote 2 of 5 records" in capsys.readouterr().out
  assert _all(sources.open_source(f"arrayrecord:{out}")) == [
      records.pair((files / "a.png").read_bytes(), "good one"),
      records.pair((files / "b.jpg").read_bytes(), "good two")]
  with pytest.raises(SystemExit) as e:  # shards already there
    prepare_cli.main([f"pairs:{files}/prep.jsonl", "--out", str(out)])
  assert e.value.code == 2 and "already holds" in capsys.readouterr().err


# ----------------------------------------------------------------------------- preprocessing


def _reference_understanding(img: Image.Image, size: int) -> np.ndarray:
  """VLMImageProcessor restated with PIL (reference doc §4.3), in float64."""
  w, h = img.size
  s = max(w, h)
  hh, ww = max(int(h / s * size), 14), max(int(w / s * size), 14)
  img = img.resize((ww, hh), Image.BICUBIC)
  if ww != hh:
    side = max(ww, hh)
    canvas = Image.new("RGB", (side, side), (127, 127, 127))
    canvas.paste(img, (0, (ww - hh) // 2) if ww > hh else ((hh - ww) // 2, 0))
    img = canvas
  return (np.asarray(img, np.float64) * (1 / 255) - 0.5) / 0.5


@pytest.mark.parametrize("wh", [(500, 300), (300, 500), (61, 17), (17, 61)])
def test_understanding_preprocessing_matches_the_reference(wh):
  img = Image.fromarray(np.random.default_rng(sum(wh)).integers(0, 256, (wh[1], wh[0], 3), np.uint8))
  got = processor.understanding_image(img, 384)
  want = _reference_understanding(img, 384)
  assert got.shape == (384, 384, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  corner = got[0 if wh[0] > wh[1] else 192, 0 if wh[0] < wh[1] else 192]  # in the padding
  np.testing.assert_allclose(corner, (127 / 255 - 0.5) / 0.5, atol=1e-6, rtol=0)


def test_generation_preprocessing_is_a_crop_of_the_short_side_resize():
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), np.uint8))
  got = processor.generation_image(img, 32, np.random.default_rng(3))
  resized = processor.normalize(np.asarray(img.resize((51, 32), Image.BICUBIC)))
  assert any(np.array_equal(got, resized[:, x:x + 32]) for x in range(51 - 32 + 1))


# ----------------------------------------------------------------------------- jfl-cache-latents


def _random_params(abstract, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.2).astype(np.float32), nn.meta.unbox(abstract))


def test_cache_latents_and_train_on_them(files, tmp_path, capsys):
  cfg = JanusFlowConfig.tiny()
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
  sig = siglip_lib.SiglipEncoder(cfg.siglip)
  sig_params = _random_params(jax.eval_shape(sig.init, jax.random.key(0), x)["params"], 0)
  vae_params = _random_params(vae_lib.abstract_params(cfg.vae), 1)
  checkpoint.save_converted(str(tmp_path / "ckpt"), cfg, {"siglip": sig_params}, vae_params)
  imgs = [np.random.default_rng(i).integers(0, 256, (32 + 8 * i, 32, 3), np.uint8) for i in range(3)]
  for i, im in enumerate(imgs):
    Image.fromarray(im).save(tmp_path / f"{i}.png")
  (tmp_path / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in (
      {"image": "0.png", "caption": "a red circle"}, {"image": str(files / "trunc.jpg"), "caption": "x"},
      {"image": "1.png", "caption": "a blue square"}, {"image": "2.png", "caption": "a green circle"})))
  out = tmp_path / "latents"
  summary = cache_cli.main([f"pairs:{tmp_path}/gen.jsonl", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out),
                            "--batch-size", "2", "--seed", "5"])
  assert summary["written"] == 3 and summary["skipped"] == {"bad_image": 1}
  assert "wrote 3 of 4 records" in capsys.readouterr().out
  recs = _all(sources.open_source(f"arrayrecord:{out}"))
  assert [r["caption"] for r in recs] == ["a red circle", "a blue square", "a green circle"]
  # Position p of the reader (0, 2, 3 for the good rows) seeds the crop.
  pix = np.stack([processor.generation_image(Image.fromarray(im), 32, np.random.default_rng((5, 0, pos)))
                  for im, pos in zip(imgs, (0, 2, 3))])
  vae = vae_lib.AutoencoderKL(cfg.vae)
  mean, _ = vae.apply({"params": vae_params}, pix, method=vae.encode)
  want_lat = np.asarray(vae_lib.scale_latents(mean, cfg.vae))
  want_repa = np.asarray(sig.apply({"params": sig_params}, pix))
  got_lat = np.stack([records.unpack_array(r["latent"]) for r in recs])
  got_repa = np.stack([records.unpack_array(r["repa"]) for r in recs])
  assert got_lat.shape == (3, 16, 16, 4) and got_repa.shape == (3, 64, 32) and got_repa.dtype == np.float16
  np.testing.assert_allclose(got_lat, want_lat, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_repa, want_repa, rtol=2e-3, atol=2e-3)

  # The pipeline reads them in place of images.
  tok = T.build_tokenizer(str(tmp_path / "tok"))
  config = tiny.get_config()
  config.data = pipeline.default_data_config()
  config.data.update(gen_sources=f"arrayrecord:{out}", mix_schedule="0=0:1:0", cached_latents=True, seq_len=256,
                     batch_size=2, shuffle=False, prefetch=0)
  batch = next(pipeline.make_train_iterator(config, tok))
  assert "gen_images" not in batch
  assert batch["gen_latents"].shape == (2, 3, 16, 16, 4) and batch["gen_repa_target"].shape == (2, 3, 64, 32)
  np.testing.assert_array_equal(batch["gen_latents"][0, 0], got_lat[0])
  np.testing.assert_array_equal(batch["gen_repa_target"][0, 1], got_repa[1].astype(np.float32))
  assert set(batch) == set(pipeline.batch_spec(config))
  with pytest.raises(SystemExit):
    cache_cli.main([f"pairs:{tmp_path}/gen.jsonl", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o2")])
  assert "not a converted jfl checkpoint" in capsys.readouterr().err
