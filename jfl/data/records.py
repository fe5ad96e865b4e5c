"""Data records: the dict schema every source yields, its ArrayRecord encoding, skip reasons.

Every source (`jfl.data.sources`) returns one of these plain dicts per index:

  {"kind": "pair", "image": IMG, "caption": str}                   image-text pair
  {"kind": "conversation", "images": [IMG, ...],                   chat; roles "User"/"Assistant",
   "messages": [{"role": str, "content": str}, ...]}                 images referenced by <image_placeholder>
  {"kind": "text", "text": str}                                    text-only document
  {"kind": "latent", "caption": str, "latent": ARR, "repa": ARR}    cached generation pair (jfl-cache-latents)
  {"kind": "skip", "reason": str}                                  a record that could not be read

IMG is the encoded file (bytes) or a path (str). ARR is {"dtype", "shape", "data": bytes} (see
`pack_array`); "repa" may be None. `jfl-prepare` stores records with msgpack in ArrayRecord shards
(`data-NNNNN.array_record`, group_size 1 for random access), images embedded as bytes.
"""

import glob
import os

import msgpack
import numpy as np

PAIR, CONVERSATION, TEXT, LATENT, SKIP = "pair", "conversation", "text", "latent", "skip"
KINDS = (PAIR, CONVERSATION, TEXT, LATENT, SKIP)

# Why a record was dropped. Counted by the pipeline and by the CLIs, never fatal.
SKIP_REASONS = (
    "missing_image",         # image file not found
    "bad_image",             # image cannot be decoded (truncated, corrupt, not an image)
    "empty_caption",         # pair / cached latent with an empty caption
    "empty_text",            # text-only record with no text
    "bad_conversation",      # malformed conversation (roles, non-string turns)
    "empty_response",        # conversation whose last turn is not a non-empty Assistant answer
    "image_count_mismatch",  # number of <image_placeholder> tags differs from the number of images
    "too_many_images",       # more images than the per-row image slots
    "too_long",              # example longer than the packed sequence (never truncated)
    "wrong_kind",            # record kind unusable for this data type (e.g. a text record as generation)
    "bad_record",            # unreadable / malformed source row
    "error",                 # unexpected exception while preprocessing (logged)
)


def pair(image, caption: str) -> dict:
  return {"kind": PAIR, "image": image, "caption": caption}


def conversation(images: list, messages: list[dict]) -> dict:
  return {"kind": CONVERSATION, "images": list(images), "messages": messages}


def text(txt: str) -> dict:
  return {"kind": TEXT, "text": txt}


def latent(caption: str, lat: np.ndarray, repa: np.ndarray | None) -> dict:
  return {"kind": LATENT, "caption": caption, "latent": pack_array(lat),
          "repa": None if repa is None else pack_array(repa)}


def skip(reason: str) -> dict:
  assert reason in SKIP_REASONS, reason
  return {"kind": SKIP, "reason": reason}


def pack_array(x: np.ndarray) -> dict:
  x = np.ascontiguousarray(x)
  return {"dtype": x.dtype.str, "shape": list(x.shape), "data": x.tobytes()}


def unpack_array(d: dict) -> np.ndarray:
  return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])


def encode(record: dict) -> bytes:
  return msgpack.packb(record, use_bin_type=True)


def decode(raw: bytes) -> dict:
  """Bytes from an ArrayRecord shard -> record; undecodable bytes give a "bad_record" skip."""
  try:
    record = msgpack.unpackb(raw, raw=False)
  except (ValueError, msgpack.UnpackException):
    return skip("bad_record")
  if not isinstance(record, dict) or record.get("kind") not in KINDS:
    return skip("bad_record")
  return record


def shard_paths(path: str) -> list[str]:
  """ArrayRecord files of a directory, a glob or a single file, sorted; ValueError if none."""
  if os.path.isdir(path):
    path = os.path.join(path, "*.array_record")
  paths = sorted(glob.glob(path))
  if not paths:
    raise ValueError(f"no ArrayRecord files match {path!r}")
  return paths


class ShardWriter:
  """Writes records to `out_dir/data-NNNNN.array_record`, `records_per_shard` per file."""

  def __init__(self, out_dir: str, records_per_shard: int = 10000):
    if records_per_shard < 1:
      raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    os.makedirs(out_dir, exist_ok=True)
    if glob.glob(os.path.join(out_dir, "*.array_record")):
      raise ValueError(f"{out_dir} already holds ArrayRecord shards; choose an empty output directory")
    self.out_dir, self.per_shard = out_dir, records_per_shard
    self.num_records, self.paths, self._writer, self._in_shard = 0, [], None, 0

  def write(self, record: dict) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
    if self._writer is None or self._in_shard == self.per_shard:
      self._close_shard()
      self.paths.append(os.path.join(self.out_dir, f"data-{len(self.paths):05d}.array_record"))
      self._writer = ArrayRecordWriter(self.paths[-1], "group_size:1")
    self._writer.write(encode(record))
    self._in_shard += 1
    self.num_records += 1

  def _close_shard(self):
    if self._writer is not None:
      self._writer.close()
    self._writer, self._in_shard = None, 0

  def close(self) -> None:
    self._close_shard()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
