"""The shapes demo: data set determinism and splits, tokenizer coverage, evaluator correctness."""

import itertools

import numpy as np
import pytest

from jfl.demo import evaluate as E
from jfl.demo import shapes as S
from jfl.demo import tokenizer as T


def _same(a: S.Example, b: S.Example) -> bool:
  return (np.array_equal(a.image, b.image) and a.image.dtype == b.image.dtype
          and (a.shape, a.colour, a.position, a.caption, a.conversations, a.text, a.layout)
          == (b.shape, b.colour, b.position, b.caption, b.conversations, b.text, b.layout))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return T.build_tokenizer(str(tmp_path_factory.mktemp("demo_tok")))


# ----------------------------------------------------------------------------- data set


def test_item_is_deterministic_per_split_seed_index():
  a, b = S.ShapesDataset("train", 3, 500), S.ShapesDataset("train", 3, 500)
  for i in (0, 7, 59, 60, 499):
    assert _same(a[i], a[i]) and _same(a[i], b[i])
  # Independent of the length; negative indices and numpy ints work; out of range raises.
  assert _same(S.ShapesDataset("train", 3, 8)[7], a[7])
  assert _same(a[-1], a[499]) and _same(a[np.int64(7)], a[7])
  with pytest.raises(IndexError):
    a[500]
  ex = a[0]
  assert ex.image.shape == (32, 32, 3) and ex.image.dtype == np.uint8
  assert S.ShapesDataset("test", 0, 4, image_size=64)[0].image.shape == (64, 64, 3)


def test_different_seeds_differ():
  a, b = S.ShapesDataset("train", 0, 64), S.ShapesDataset("train", 1, 64)
  assert sum(not _same(a[i], b[i]) for i in range(64)) > 32
  assert [a.attributes(i) for i in range(60)] != [b.attributes(i) for i in range(60)]


def test_grain_source_protocol():
  import grain
  ds = S.ShapesDataset("test", 0, 30)
  assert isinstance(ds, grain.sources.RandomAccessDataSource)
  assert _same(grain.MapDataset.source(ds)[5], ds[5])


def test_splits_are_disjoint_and_balanced():
  train, test = S.combos("train"), S.combos("test")
  assert len(train) == 60 and len(test) == 12 and not set(train) & set(test)
  assert set(train) | set(test) == set(itertools.product(S.SHAPES, S.COLOURS, S.POSITIONS))
  # Every attribute pair of a held-out triple is still seen in training.
  for s, c, p in test:
    for keep in ((0, 1), (1, 2), (0, 2)):
      assert any(all(t[k] == (s, c, p)[k] for k in keep) for t in train)
  dtr, dte = S.ShapesDataset("train", 0, 600), S.ShapesDataset("test", 0, 600)
  # Each block of len(combos) items is a permutation of the split's triples.
  assert sorted(dtr.attributes(i) for i in range(60, 120)) == sorted(train)
  items_tr = [dtr[i] for i in range(600)]
  items_te = [dte[i] for i in range(600)]
  assert all(S.is_heldout(e.shape, e.colour, e.position) for e in items_te)
  assert not any(S.is_heldout(e.shape, e.colour, e.position) for e in items_tr)
  key = lambda e: (e.shape, e.colour, e.position, e.layout)
  assert not {key(e) for e in items_tr} & {key(e) for e in items_te}
  assert not {e.image.tobytes() for e in items_tr} & {e.image.tobytes() for e in items_te}
  # Held-out prompts use only words seen in training prompts.
  train_words = {w for e in items_tr for w in e.caption.split()}
  assert {w for e in items_te for w in e.caption.split()} <= train_words
  with pytest.raises(ValueError):
    S.combos("val")


def test_texts_match_attributes():
  ds = S.ShapesDataset("train", 5, 120)
  for i in range(0, 120, 7):
    e = ds[i]
    where = "on the" if e.position in ("left", "right") else "at the"
    assert e.caption == f"a {e.colour} {e.shape} {where} {e.position}"
    assert dict(e.conversations) == {"What colour is the shape?": e.colour,
                                     "What shape is it?": e.shape, "Where is the shape?": e.position}
    assert all(len(a.split()) == 1 for _, a in e.conversations)
    assert e.text in S.sentences(e.shape, e.colour, e.position) and e.text in S.text_corpus()
    assert E.describe(e.image) == dict(colour=e.colour, position=e.position, shape=e.shape)
    # Pixels are exactly background or the palette colour.
    colours = {tuple(int(v) for v in px) for px in e.image.reshape(-1, 3)}
    assert colours == {S.BACKGROUND, S.PALETTE[e.colour]}


def test_palette_is_well_separated():
  ref = np.array([S.BACKGROUND, *S.PALETTE.values()], float)
  d = np.linalg.norm(ref[:, None] - ref[None], axis=-1) + 1e9 * np.eye(len(ref))
  assert d.min() > 130


# ----------------------------------------------------------------------------- tokenizer


def _all_prompts():
  out = list(S.all_texts())
  for s, c, p in itertools.product(S.SHAPES, S.COLOURS, S.POSITIONS):
    out.append(T.generation_prompt(S.caption(s, c, p)) + T.BOI)
    for q, a in S.conversations(s, c, p):
      out += [T.understanding_prompt(q), T.understanding_prompt(q, a)]
  return sorted(set(out))


def test_every_text_tokenizes_and_round_trips(tok):
  assert len(tok) == T.VOCAB_SIZE == T.vocab_size() < 256
  texts = _all_prompts()
  assert T.understanding_prompt("What shape is it?", "circle") == (
      T.SYSTEM_PROMPT + "\n\nUser: <image_placeholder>\nWhat shape is it?\n\nAssistant: circle" + T.EOS)
  assert T.generation_prompt("a red circle on the left") == "User: a red circle on the left\n\nAssistant:"
  for text in texts:
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, text
    assert tok.unk_token_id not in ids, text
    words = [p for p in T.pieces(text) if p not in T.SPECIAL_TOKENS]
    assert T.pieces(tok.decode(ids, skip_special_tokens=True)) == words, text
  # Chat structure is tokenized: role words, ":" and the "\n\n" separator are tokens.
  toks = tok.convert_ids_to_tokens(tok.encode(T.understanding_prompt("Where is the shape?", "left")))
  assert toks[-5:] == ["\n\n", "Assistant", ":", "left", T.EOS]
  assert toks[toks.index("User"):toks.index("User") + 4] == ["User", ":", T.IMAGE_TAG, "\n"]
  # Out-of-vocabulary words map to the unknown token.
  assert tok.encode("zebra")[1:] == [tok.unk_token_id]


def test_special_tokens_resolve_to_distinct_ids(tok, tmp_path):
  ids = tok.convert_tokens_to_ids(list(T.SPECIAL_TOKENS))
  assert len(set(ids)) == len(T.SPECIAL_TOKENS) and all(isinstance(i, int) for i in ids)
  assert tok.unk_token_id not in [i for t, i in zip(T.SPECIAL_TOKENS, ids) if t != T.UNK]
  assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (T.BOS, T.EOS, T.PAD, T.UNK)
  assert tok.pad_token_id == tok.convert_tokens_to_ids(T.PAD) and tok.padding_side == "left"
  for t in (T.IMAGE_TAG, T.BOI, T.EOI):  # single tokens, skipped on decode
    assert tok.encode(t) == [tok.bos_token_id, tok.convert_tokens_to_ids(t)]
    assert tok.decode(tok.encode(f"a {t} red"), skip_special_tokens=True) == "a red"
  # The saved standard-format files reload to the same tokenizer (AutoTokenizer resolves the
  # same class; importing it costs ~3 s, so load the class directly).
  import json
  from transformers import PreTrainedTokenizerFast
  T.build_tokenizer(str(tmp_path))
  assert {"tokenizer.json", "tokenizer_config.json"} <= {f.name for f in tmp_path.iterdir()}
  cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert cfg["pad_token"] == T.PAD and cfg["bos_token"] == T.BOS and cfg["eos_token"] == T.EOS
  loaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
  text = T.understanding_prompt("What colour is the shape?", "red")
  assert loaded.encode(text) == tok.encode(text) and loaded.pad_token_id == tok.pad_token_id
  batch = loaded(["a red", "a red circle"], padding=True)["input_ids"]
  assert batch[0][0] == loaded.pad_token_id and batch[1][0] == loaded.bos_token_id


# ----------------------------------------------------------------------------- evaluator


def test_evaluator_scores_rendered_images_perfectly():
  imgs, attrs = [], []
  for s, c, p in itertools.product(S.SHAPES, S.COLOURS, S.POSITIONS):
    for lay in S.all_layouts(p)[:: (1 if c == "red" else 13)]:  # all jitters for one colour
      imgs.append(S.draw(s, c, lay))
      attrs.append((s, c, p))
  scores = E.score_generation(imgs, attrs)
  assert scores["n"] == len(imgs) > 1000
  assert scores["colour_acc"] == scores["position_acc"] == scores["both_acc"] == 1.0
  assert scores["shape_acc"] == 1.0
  # Other attribute formats; larger images.
  ds = S.ShapesDataset("test", 0, 24, image_size=64)
  exs = [ds[i] for i in range(24)]
  assert E.score_generation(np.stack([e.image for e in exs]), exs)["both_acc"] == 1.0
  dicts = [dict(colour=e.colour, position=e.position) for e in exs]
  got = E.score_generation([e.image for e in exs], dicts)
  assert got["both_acc"] == 1.0 and np.isnan(got["shape_acc"])


def test_evaluator_rejects_wrong_images():
  rng = np.random.default_rng(0)
  wrong_c, wrong_p, ok, attrs = [], [], [], []
  for s, c, p in itertools.product(S.SHAPES, S.COLOURS, S.POSITIONS):
    other_c = S.COLOURS[(S.COLOURS.index(c) + 1 + rng.integers(5)) % 6]
    other_p = S.POSITIONS[(S.POSITIONS.index(p) + 1 + rng.integers(3)) % 4]
    lay = S.sample_layout(p, 32, rng)
    ok.append(S.draw(s, c, lay))
    wrong_c.append(S.draw(s, other_c, lay))
    wrong_p.append(S.render(s, c, other_p, 32, rng))
    attrs.append((s, c, p))
  r = E.score_generation(wrong_c, attrs)
  assert r["colour_acc"] == 0.0 and r["position_acc"] == 1.0 and r["both_acc"] == 0.0
  r = E.score_generation(wrong_p, attrs)
  assert r["colour_acc"] == 1.0 and r["position_acc"] == 0.0 and r["both_acc"] == 0.0
  blank = np.full((32, 32, 3), S.BACKGROUND, np.uint8)
  flood = np.full((32, 32, 3), S.PALETTE["red"], np.uint8)
  speck = blank.copy()
  speck[3:5, 3:5] = S.PALETTE["red"]  # 4 pixels < 1%: no shape
  for img in (blank, flood, speck):
    assert E.describe(img) == dict(colour="none", position="none", shape="none")
  r = E.score_generation([blank] * 3, attrs[:3])
  assert r["colour_acc"] == r["position_acc"] == r["shape_acc"] == 0.0
  # Mild noise on a correct image does not change the verdict.
  noisy = [np.clip(im.astype(int) + rng.integers(-40, 41, im.shape), 0, 255).astype(np.uint8)
           for im in ok]
  assert E.score_generation(noisy, attrs)["both_acc"] == 1.0
  with pytest.raises(ValueError):
    E.dominant_colour(np.zeros((32, 32, 3), np.float32))


def test_to_uint8_and_score_answers():
  x = np.array([[-1.0, 0.0, 1.0, 2.0]], np.float32)[..., None].repeat(3, -1)
  assert E.to_uint8(x)[0, :, 0].tolist() == [0, 128, 255, 255]
  assert E.score_answers([" Red ", "blue", "left\n", "circle."], ["red", "red", "left", "circle"]) == 0.5
  assert E.score_answers([], []) == 0.0
  with pytest.raises(ValueError):
    E.score_answers(["a"], [])
