"""Records -> examples: image decoding, the reference preprocessing, deepseek chat-template tokenisation.

Understanding: `jfl.processor.understanding_image` (long side to the resolution, pad to square with
(127,127,127), [-1, 1]); the system prompt is `UNDERSTANDING_SYSTEM_PROMPT`; every `<image_placeholder>`
becomes BOI + P x placeholder + EOI; loss only on Assistant answers (+ their EOS). Caption pairs used
for understanding become [User: "<image_placeholder>\\n{caption_prompt}", Assistant: caption].
Generation: `jfl.processor.generation_image` (short side to the resolution, random square crop), prompt
`sft_prompt([User: caption, Assistant: ""])` = "User: {caption}\\n\\nAssistant:", then the T_EMB slot and P
latent slots (ids BOI and <image_placeholder>; the model ignores them). Text-only: BOS + text + EOS,
loss on every token after BOS; image-less conversations are text-only chats.

An example is a dict of numpy arrays (n tokens, P image tokens, k understanding images):
  task int; tokens int32 [n] (BOS first); response bool [n] (AR targets);
  und_slots bool [n]; und_images f32 [k, H, W, 3]                     (understanding)
  gen_slots bool [n]; prompt bool [n]; gen_image f32 [H, W, 3]         (generation, on the fly)
                                       or gen_latent [h, w, c] + gen_repa [P, C] (cached)
A record that cannot be used becomes {"skip": reason} (reasons: `records.SKIP_REASONS`).
"""

import dataclasses
import io
import logging

import grain
import numpy as np
from PIL import Image

from jfl import batch as batch_lib
from jfl import processor
from jfl import tokenizer as tok_lib
from jfl.data import records

UND, GEN, TEXT = "und", "gen", "text"
DATA_TYPES = (UND, GEN, TEXT)
_log = logging.getLogger(__name__)
_MAX_ERROR_LOGS = 5


class Skip(Exception):
  """A record that is dropped and counted under `reason`."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """What preprocessing needs to know about the batch."""
  seq_len: int
  image_size: int
  num_image_tokens: int          # P
  max_und_images: int            # understanding image slots per row
  caption_prompt: str = "Describe this image in detail."
  cached: bool = False           # generation records are cached latents
  latent_shape: tuple[int, ...] | None = None  # (h, w, c) of cached latents
  repa_shape: tuple[int, ...] | None = None    # (P, C) of cached REPA targets; None = not cached


def open_image(ref) -> Image.Image:
  """Encoded bytes or a path -> RGB PIL image; Skip("missing_image" | "bad_image")."""
  if isinstance(ref, str):
    try:
      with open(ref, "rb") as f:
        ref = f.read()
    except OSError:
      raise Skip("missing_image") from None
  try:
    with Image.open(io.BytesIO(ref)) as img:
      return img.convert("RGB")  # forces a full decode: truncated files fail here
  except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
    raise Skip("bad_image") from None


def render_chat(messages: list[dict], system: str) -> tuple[str, list[tuple[int, int]]]:
  """`tok_lib.sft_prompt(messages, system)` and the character spans of the answers (odd turns + EOS)."""
  text, spans = (f"{system}\n\n" if system else ""), []
  for i, m in enumerate(messages):
    content, head = m["content"].strip(), f"{m['role']}: "
    if not content:
      text += f"{m['role']}:"
      continue
    if i % 2:
      spans.append((len(text) + len(head), len(text) + len(head) + len(content) + len(tok_lib.EOS)))
    text += head + content + ("\n\n" if i % 2 == 0 else tok_lib.EOS)
  lead = len(text) - len(text.lstrip())
  text = text.strip()
  assert text == tok_lib.sft_prompt(messages, system)
  return text, [(a - lead, min(b - lead, len(text))) for a, b in spans]


def backend_tokenizer(tokenizer):
  """A private copy of the fast tokenizer's Rust backend, without truncation/padding (thread-safe)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
  tok.no_truncation()
  tok.no_padding()
  return tok


class Preprocess(grain.transforms.RandomMap):
  """record -> example (or {"skip": reason}) for one data type; `rng` drives the generation crop."""

  def __init__(self, data_type: str, tokenizer, spec: ExampleSpec):
    if data_type not in DATA_TYPES:
      raise ValueError(f"data type must be one of {DATA_TYPES}, got {data_type!r}")
    self.data_type, self.spec = data_type, spec
    self.ids = tok_lib.special_ids(tokenizer)
    self.tok = backend_tokenizer(tokenizer)
    self._errors = 0

  def random_map(self, record, rng: np.random.Generator):
    try:
      return self.example(record, rng)
    except Skip as s:
      return {"skip": s.reason}
    except Exception:  # pylint: disable=broad-except
      self._errors += 1
      if self._errors <= _MAX_ERROR_LOGS:
        _log.exception("jfl.data: %s record could not be preprocessed; skipped", self.data_type)
      return {"skip": "error"}

  def example(self, record: dict, rng: np.random.Generator) -> dict:
    kind = record.get("kind")
    if kind == records.SKIP:
      raise Skip(record.get("reason", "bad_record"))
    if self.data_type == GEN:
      if kind != (records.LATENT if self.spec.cached else records.PAIR):
        raise Skip("wrong_kind")
      return self.generation(record, rng)
    if kind == records.CONVERSATION:
      return self.conversation(record["messages"], record["images"])
    if self.data_type == UND and kind == records.PAIR:
      caption = record["caption"].strip()
      if not caption:
        raise Skip("empty_caption")
      return self.conversation([{"role": "User", "content": f"{tok_lib.IMAGE}\n{self.spec.caption_prompt}"},
                                {"role": "Assistant", "content": caption}], [record["image"]])
    if self.data_type == TEXT and kind == records.TEXT:
      return self.text(record["text"])
    raise Skip("wrong_kind")

  # --- per kind --------------------------------------------------------------------------------

  def _encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """BOS + ids of `text`, and their character offsets ([n, 2]; BOS gets (0, 0))."""
    enc = self.tok.encode(text, add_special_tokens=False)
    ids = np.asarray([self.ids.bos] + enc.ids, np.int32)
    return ids, np.asarray([(0, 0)] + enc.offsets, np.int64).reshape(-1, 2)

  def text(self, txt: str) -> dict:
    if not txt.strip():
      raise Skip("empty_text")
    ids, _ = self._encode(txt)
    tokens = np.append(ids, np.int32(self.ids.eos))
    self._check_len(len(tokens))
    return {"task": batch_lib.TASK_TEXT, "tokens": tokens, "response": np.arange(len(tokens)) > 0}

  def conversation(self, messages: list[dict], images: list) -> dict:
    s, p = self.spec, self.spec.num_image_tokens
    _check_turns(messages)
    if images and not any(tok_lib.IMAGE in m["content"] for m in messages):
      messages = [{**messages[0], "content": f"{tok_lib.IMAGE}\n{messages[0]['content']}"}, *messages[1:]]
    if self.data_type == TEXT and images:
      raise Skip("wrong_kind")
    text, spans = render_chat(messages, tok_lib.UNDERSTANDING_SYSTEM_PROMPT)
    ids, offsets = self._encode(text)
    response = np.zeros(len(ids), bool)
    for a, b in spans:
      response |= (offsets[:, 1] > a) & (offsets[:, 0] < b)
    response[0] = False
    is_img = ids == self.ids.image
    if int(is_img.sum()) != len(images):
      raise Skip("image_count_mismatch")
    if len(images) > s.max_und_images:
      raise Skip("too_many_images")
    self._check_len(len(ids) + len(images) * (p + 1))
    pixels = np.stack([processor.understanding_image(open_image(im), s.image_size) for im in images]) \
        if images else np.zeros((0, s.image_size, s.image_size, 3), np.float32)
    # Each placeholder id becomes BOI + P placeholders + EOI.
    rep = np.where(is_img, p + 2, 1)
    tokens, response = np.repeat(ids, rep), np.repeat(response & ~is_img, rep)
    und_slots = np.zeros(len(tokens), bool)
    for start in (np.cumsum(rep) - rep)[is_img]:
      tokens[start], tokens[start + p + 1] = self.ids.boi, self.ids.eoi
      und_slots[start:start + p + 1] = True
    task = batch_lib.TASK_UND if images else batch_lib.TASK_TEXT
    return {"task": task, "tokens": tokens, "response": response, "und_slots": und_slots, "und_images": pixels}

  def generation(self, record: dict, rng: np.random.Generator) -> dict:
    s, p = self.spec, self.spec.num_image_tokens
    caption = record["caption"].strip()
    if not caption:
      raise Skip("empty_caption")
    ids, _ = self._encode(tok_lib.sft_prompt([{"role": "User", "content": caption},
                                              {"role": "Assistant", "content": ""}]))
    n = len(ids)
    self._check_len(n + 1 + p)
    tokens = np.concatenate([ids, [self.ids.boi], np.full(p, self.ids.image)]).astype(np.int32)
    gen_slots = np.arange(n + 1 + p) >= n
    ex = {"task": batch_lib.TASK_GEN, "tokens": tokens, "gen_slots": gen_slots,
          "prompt": (np.arange(n + 1 + p) > 0) & ~gen_slots}
    if not s.cached:
      ex["gen_image"] = processor.generation_image(open_image(record["image"]), s.image_size, rng)
      return ex
    ex["gen_latent"] = _cached(record["latent"], s.latent_shape, "latent")
    if s.repa_shape is not None:
      if record.get("repa") is None:
        raise ValueError("cached latents have no REPA targets: re-run jfl-cache-latents with --repa, or set "
                         "config.data.cached_repa=False")
      ex["gen_repa"] = _cached(record["repa"], s.repa_shape, "REPA target")
    return ex

  def _check_len(self, n: int):
    if n > self.spec.seq_len:
      raise Skip("too_long")


def _check_turns(messages: list[dict]):
  """User/Assistant alternation starting with User, ending with a non-empty Assistant answer."""
  if not messages or any(m["role"] != ("User", "Assistant")[i % 2] for i, m in enumerate(messages)):
    raise Skip("bad_conversation")
  if len(messages) % 2 or not messages[-1]["content"].strip():
    raise Skip("empty_response")
  if any(not m["content"].strip() for m in messages[1::2]):
    raise Skip("bad_conversation")


def _cached(packed: dict, shape, what: str) -> np.ndarray:
  x = records.unpack_array(packed)
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"cached {what} has shape {tuple(x.shape)}, the model expects {tuple(shape)}: the cache "
                     "was made for another image size or encoder")
  return x.astype(np.float32)
