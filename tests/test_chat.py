"""Understanding: the processor's arrays, cached AR decoding vs full recomputation in the PyTorch reference."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.test_sampling import CFG, build_checkpoint, fast_compile  # noqa: F401 (autouse fixture)
from tests.torch_refs import rel_err

from jfl import chat, checkpoint, processor, tokenizer as tok_lib  # noqa: E402
from jfl.cli import chat as chat_cli  # noqa: E402
from jfl.demo import tokenizer as demo_tok  # noqa: E402
from jfl.pipeline import JanusFlowPipeline  # noqa: E402
from jfl.sampling import text  # noqa: E402

P = CFG.siglip.grid ** 2


def _image(path, size, box, colour):
  img = Image.new("RGB", size, (240, 240, 240))
  ImageDraw.Draw(img).rectangle(box, fill=colour)
  img.save(path)
  return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(reference, pipeline from HF layout, converted dir with tokenizer, two image paths)."""
  root = tmp_path_factory.mktemp("chat")
  ref, model_dir, vae_dir = build_checkpoint(str(root))
  pipe = JanusFlowPipeline.from_pretrained(model_dir, vae_dir=vae_dir)
  converted = str(root / "converted")
  checkpoint.save_converted(converted, pipe.config, pipe.params, pipe.vae_params)
  demo_tok.build_tokenizer(converted)
  images = (_image(root / "wide.png", (48, 30), (5, 5, 30, 20), (200, 30, 30)),
            _image(root / "tall.png", (20, 36), (2, 10, 15, 30), (30, 30, 200)))
  return ref, pipe, converted, images


def _conversations(images):
  """Two conversations of different lengths: one image; two images over two turns."""
  one = chat.conversation(images[0], "what shape is this?")
  two = [{"role": "User", "content": f"{tok_lib.IMAGE}\nwhat colour is this?", "images": [images[0]]},
         {"role": "Assistant", "content": "red"},
         {"role": "User", "content": f"and this? {tok_lib.IMAGE}", "images": [images[1]]}]
  return [one, two]


def test_prompt_format():
  one = chat.format_prompt(chat.conversation("x.png", "what shape is this?"))
  assert one == f"{tok_lib.UNDERSTANDING_SYSTEM_PROMPT}\n\nUser: {tok_lib.IMAGE}\nwhat shape is this?\n\nAssistant:"
  multi = chat.format_prompt([{"role": "User", "content": "q1"}, {"role": "Assistant", "content": "a1"},
                              {"role": "User", "content": "q2"}], system="")
  assert multi == f"User: q1\n\nAssistant: a1{tok_lib.EOS}User: q2\n\nAssistant:"


def test_processor_arrays(setup):
  ref, pipe, _, images = setup
  tok = pipe.tokenizer
  ids_of = tok_lib.special_ids(tok)
  convs = _conversations(images)
  batch = chat.process(tok, convs, CFG.image_size, P)
  b, t = batch.input_ids.shape
  rows = []
  for conv in convs:   # expected: split the encoded prompt at the placeholders, splice BOI + P slots + EOI
    ids = tok.encode(chat.format_prompt(conv))
    row = []
    for i in ids:
      row += [ids_of.boi] + [ids_of.image] * P + [ids_of.eoi] if i == ids_of.image else [i]
    rows.append(np.array(row))
  assert t == max(map(len, rows)) and len(rows[0]) < len(rows[1])
  for i, row in enumerate(rows):
    np.testing.assert_array_equal(batch.input_ids[i, t - len(row):], row)
    assert (batch.input_ids[i, :t - len(row)] == ids_of.pad).all()
    np.testing.assert_array_equal(batch.attention_mask[i], np.arange(t) >= t - len(row))
  is_slot = (batch.input_ids == ids_of.image) | (batch.input_ids == ids_of.boi)
  np.testing.assert_array_equal(batch.images_seq_mask, is_slot)
  assert batch.images_seq_mask.sum(1).tolist() == [P + 1, 2 * (P + 1)]
  assert batch.images_emb_mask.shape == (2, 2, P + 1)
  np.testing.assert_array_equal(batch.images_emb_mask.all(-1), [[True, False], [True, True]])
  assert not batch.images_emb_mask[0, 1].any() and not batch.pixel_values[0, 1].any()
  for (i, j), path in zip([(0, 0), (1, 0), (1, 1)], [images[0], images[0], images[1]]):
    want = processor.understanding_image(processor.load_image(path), CFG.image_size).transpose(2, 0, 1)
    np.testing.assert_array_equal(batch.pixel_values[i, j], want)
  mask = batch.attention_mask.astype(bool)
  got = np.asarray(pipe.understanding_logits(**batch.arrays()))
  want = ref.understanding_logits(**batch.arrays())
  assert rel_err(got[mask], want[mask]) <= 1e-5, rel_err(got[mask], want[mask])


def _full_recompute_greedy(ref, batch, m):
  """Greedy decoding with the reference, recomputing the whole sequence for every token."""
  ids, attention, seq = batch.input_ids, batch.attention_mask, batch.images_seq_mask
  out = []
  for _ in range(m):
    logits = ref.understanding_logits(ids, batch.pixel_values, seq, batch.images_emb_mask, attention)
    nxt = logits[:, -1].argmax(-1)
    out.append(nxt)
    ids = np.concatenate([ids, nxt[:, None]], 1)
    attention = np.concatenate([attention, np.ones((len(ids), 1), attention.dtype)], 1)
    seq = np.concatenate([seq, np.zeros((len(ids), 1), bool)], 1)
  return np.stack(out, 1)


def test_greedy_decoding_equals_full_recomputation(setup):
  ref, pipe, _, images = setup
  convs = _conversations(images)
  m = 6
  tokens, lengths = pipe.answer_tokens(convs, max_new_tokens=m)
  want = _full_recompute_greedy(ref, chat.process(pipe.tokenizer, convs, CFG.image_size, P), m)
  eos = tok_lib.special_ids(pipe.tokenizer).eos
  for i in range(2):
    n = int(lengths[i])
    np.testing.assert_array_equal(tokens[i, :n], want[i, :n])
    assert n == m or tokens[i, n - 1] == eos
  answers = pipe.chat_batch(convs, max_new_tokens=m)
  assert answers == [pipe.tokenizer.decode(tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
                     for i in range(2)]
  # sampling: a tiny nucleus is greedy; a seed reproduces; another seed differs
  nucleus, _ = pipe.answer_tokens(convs, m, temperature=1.0, top_p=1e-6)
  np.testing.assert_array_equal(nucleus, tokens)
  s0, _ = pipe.answer_tokens(convs, m, temperature=1.0, top_p=1.0, seed=0)
  s0b, _ = pipe.answer_tokens(convs, m, temperature=1.0, top_p=1.0, seed=0)
  s1, _ = pipe.answer_tokens(convs, m, temperature=1.0, top_p=1.0, seed=1)
  np.testing.assert_array_equal(s0, s0b)
  assert (s0 != s1).any()


def test_stops_at_eos(setup):
  _, pipe, _, images = setup
  convs = _conversations(images)
  greedy, _ = pipe.answer_tokens(convs, max_new_tokens=6)
  batch = chat.process(pipe.tokenizer, convs, CFG.image_size, P)
  stop = int(greedy[0, 2])   # pretend the third greedy token of row 0 is EOS
  args = [jnp.asarray(x) for x in (batch.input_ids, batch.pixel_values.transpose(0, 1, 3, 4, 2),
                                   batch.images_seq_mask, batch.images_emb_mask, batch.attention_mask.astype(bool))]
  tokens, lengths = text.answer_tokens(pipe.model, pipe.params, *args, jax.random.key(0), 6, stop, -1,
                                       jnp.float32(0), jnp.float32(1))
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  first = int(np.argmax(greedy[0] == stop))
  assert lengths[0] == first + 1 and (tokens[0, first + 1:] == -1).all()
  np.testing.assert_array_equal(tokens[0, :first + 1], greedy[0, :first + 1])


def test_top_p_keeps_the_nucleus():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.asarray(np.log(probs)[None].repeat(4000, 0), jnp.float32)
  keys = jax.random.key(0)
  draws = np.asarray(text.sample_token(logits, keys, jnp.float32(1.0), jnp.float32(0.7)))
  counts = np.bincount(draws, minlength=4) / len(draws)
  assert counts[2] == counts[3] == 0                       # outside the 0.7 nucleus
  np.testing.assert_allclose(counts[:2], [0.625, 0.375], atol=0.03)
  hot = np.asarray(text.sample_token(logits, keys, jnp.float32(0.0), jnp.float32(0.7)))
  assert (hot == 0).all()                                   # temperature 0 = argmax


def test_chat_and_cli(setup, capsys):
  _, pipe, converted, images = setup
  answer = pipe.chat(images[1], "what shape is this?", max_new_tokens=4)
  tokens, lengths = pipe.answer_tokens([chat.conversation(images[1], "what shape is this?")], 4)
  assert isinstance(answer, str) and answer == pipe.tokenizer.decode(tokens[0, :lengths[0]].tolist(),
                                                                     skip_special_tokens=True)
  chat_cli.main(["--ckpt", converted, "--image", images[1], "--question", "what shape is this?",
                 "--max-new-tokens", "4", "--dtype", "float32"])
  assert capsys.readouterr().out.rstrip("\n") == answer


def test_bad_inputs(setup, tmp_path, capsys):
  _, pipe, converted, images = setup
  with pytest.raises(ValueError, match="no such file"):
    pipe.chat(str(tmp_path / "missing.png"), "what?")
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"not an image")
  with pytest.raises(ValueError, match="cannot read image"):
    pipe.chat(str(garbage), "what?")
  with pytest.raises(ValueError, match=r"1 <image_placeholder> tag\(s\) but 2 image\(s\)"):
    pipe.chat([images[0], images[1]], f"{tok_lib.IMAGE} what?")
  with pytest.raises(ValueError, match="exceeds the model's context of 512"):
    pipe.chat(images[0], "what?", max_new_tokens=1000)
  bare = JanusFlowPipeline(pipe.config, pipe.params, tokenizer=None, source="ckpt_dir")
  with pytest.raises(ValueError, match="ckpt_dir: no tokenizer"):
    bare.chat(images[0], "what?")
  for flags, message in ((["--image", str(tmp_path / "missing.png")], "no such file"),
                         (["--image", str(garbage)], "cannot read image"),
                         (["--image", images[0], "--max-new-tokens", "1000"], "exceeds the model's context")):
    with pytest.raises(SystemExit) as e:
      chat_cli.main(["--ckpt", converted, "--question", "what?", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("jfl-chat: error:") and message in err[-1], err
  no_tok = tmp_path / "no_tok"     # the converted checkpoint without its tokenizer files
  no_tok.mkdir()
  for name in (checkpoint.CONFIG_FILE, "params", "vae_params"):
    os.symlink(os.path.join(converted, name), no_tok / name)
  with pytest.raises(SystemExit) as e:
    chat_cli.main(["--ckpt", str(no_tok), "--question", "what?", "--image", images[0]])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and "no tokenizer" in err[-1], err
