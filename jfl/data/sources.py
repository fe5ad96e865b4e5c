"""Random-access readers for the data formats people already have; each yields `jfl.data.records` dicts.

A source is named by a spec string `FORMAT:PATH[?key=value&...]` (PATH: a file, a directory or a glob):

  arrayrecord:/data/prepared            shards written by jfl-prepare / jfl-cache-latents (fastest)
  llava:/data/llava.json?image_root=/data/images
                                        LLaVA-style conversations, JSON list or JSONL: {"image": path | [paths],
                                        "conversations": [{"from": "human"|"gpt", "value": "<image>\\n..."}]}
                                        (or {"images", "messages": [{"role", "content"}]}); no image = text chat
  pairs:/data/caps.jsonl?image_root=/data/img&image_key=image&caption_key=caption
                                        JSONL or Parquet rows with an image path, image bytes or {"bytes", "path"}
                                        and a caption (default keys: image|image_path|path|file_name,
                                        caption|text|prompt)
  wds:/data/shards/*.tar                WebDataset tar shards: KEY.jpg|jpeg|png|webp + KEY.txt or KEY.json
                                        ({"caption": ...}); caption_key= picks the JSON field
  tfds:coco_captions?data_dir=/data/tfds&split=train&caption_key=captions/text
                                        a prepared TFDS dataset read through `tfds.data_source` (ArrayRecord
                                        files, no TensorFlow needed); image_key= (default image)
  text:/data/corpus/*.jsonl?text_key=text
                                        text-only JSONL documents
  shapes:train?task=und&seed=0&n=8192&size=32
                                        the embedded procedural shapes dataset (jfl/demo/shapes.py; PATH is
                                        the split): task=und (the 3 questions as one multi-turn chat),
                                        gen (caption pairs) or text (sentences)

Relative image paths are resolved against image_root= (default: the directory of the first file).
Every spec also accepts `weight=W` (relative weight among the sources of one data type, default 1).
Rows that cannot be parsed become {"kind": "skip", "reason": "bad_record"}; missing or corrupt images
are only detected when the pipeline (or jfl-prepare) decodes them.
"""

import collections
import glob
import io
import itertools
import json
import os
import tarfile
import threading
import urllib.parse

import numpy as np
from PIL import Image

from jfl import tokenizer as tok_lib
from jfl.data import records

FORMATS = ("arrayrecord", "llava", "pairs", "wds", "tfds", "text", "shapes")
_OPTIONS = {
    "arrayrecord": (), "llava": ("image_root",), "pairs": ("image_root", "image_key", "caption_key"),
    "wds": ("caption_key",), "tfds": ("data_dir", "split", "image_key", "caption_key"), "text": ("text_key",),
    "shapes": ("task", "seed", "n", "size"),
}
IMAGE_KEYS = ("image", "image_path", "path", "file_name")
CAPTION_KEYS = ("caption", "text", "prompt", "captions/text")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_ROLES = {"human": "User", "user": "User", "gpt": "Assistant", "assistant": "Assistant"}


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
  """"fmt:path?k=v&..." -> (fmt, path, options); ValueError naming the problem."""
  fmt, sep, rest = spec.strip().partition(":")
  if not sep or fmt not in FORMATS:
    raise ValueError(f"data source {spec!r}: expected FORMAT:PATH[?key=value&...] with FORMAT one of "
                     f"{', '.join(FORMATS)}")
  path, _, query = rest.partition("?")
  opts = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
  unknown = sorted(set(opts) - set(_OPTIONS[fmt]) - {"weight"})
  if unknown:
    raise ValueError(f"data source {spec!r}: unknown option(s) {', '.join(unknown)}; {fmt} takes "
                     f"{', '.join(_OPTIONS[fmt] + ('weight',))}")
  if not path:
    raise ValueError(f"data source {spec!r}: empty path")
  return fmt, path, opts


def spec_weight(spec: str) -> float:
  w = parse_spec(spec)[2].get("weight", "1")
  try:
    w = float(w)
  except ValueError:
    w = -1.0
  if w < 0:
    raise ValueError(f"data source {spec!r}: weight must be a number >= 0")
  return w


def open_source(spec: str):
  """The random-access source (`len`, `[i]` -> record dict) of a spec string."""
  fmt, path, opts = parse_spec(spec)
  if fmt == "arrayrecord":
    return ArrayRecordSource(path)
  if fmt == "tfds":
    if "data_dir" not in opts:
      raise ValueError(f"data source {spec!r}: tfds needs data_dir= (the directory the dataset was prepared in)")
    return TfdsSource(path, opts["data_dir"], opts.get("split", "train"), opts.get("image_key", "image"),
                      opts.get("caption_key"))
  if fmt == "shapes":
    return ShapesSource(path, opts.get("task", "und"), int(opts.get("seed", 0)), int(opts.get("n", 8192)),
                        int(opts.get("size", 32)))
  if fmt == "wds":
    return WdsSource(_files(path, ("tar",)), opts.get("caption_key"))
  if fmt == "pairs":
    files = _files(path, ("jsonl", "json", "parquet"))
    root = opts.get("image_root", os.path.dirname(files[0]))
    conv = _PairConverter(root, opts.get("image_key"), opts.get("caption_key"))
    rows = _ParquetRows(files) if files[0].endswith(".parquet") else _JsonRows(files)
    return RowSource(rows, conv)
  files = _files(path, ("jsonl", "json"))
  if fmt == "llava":
    return RowSource(_JsonRows(files), _LlavaConverter(opts.get("image_root", os.path.dirname(files[0]))))
  return RowSource(_JsonRows(files), _TextConverter(opts.get("text_key", "text")))


def _files(path: str, exts: tuple[str, ...]) -> list[str]:
  if os.path.isdir(path):
    files = [os.path.join(path, f) for f in os.listdir(path) if f.rsplit(".", 1)[-1].lower() in exts]
  else:
    files = glob.glob(path)
  files = sorted(f for f in files if os.path.isfile(f))
  if not files:
    raise ValueError(f"no {'/'.join(exts)} files match {path!r}")
  kinds = {f.endswith(".parquet") for f in files}
  if len(kinds) > 1:
    raise ValueError(f"{path!r} mixes Parquet and JSON files; use one source spec per format")
  return files


def _lookup(obj, key: str):
  """obj["a"]["b"] for key "a/b"; the first element of lists; None when absent."""
  for part in key.split("/"):
    if isinstance(obj, list):
      obj = obj[0] if obj else None
    if not isinstance(obj, dict) or part not in obj:
      return None
    obj = obj[part]
  if isinstance(obj, list):
    obj = obj[0] if obj else None
  return obj


def _first(obj, keys):
  for k in keys:
    v = _lookup(obj, k)
    if v is not None:
      return v
  return None


def _as_text(v) -> str | None:
  if isinstance(v, bytes):
    return v.decode("utf-8", errors="replace")
  return v if isinstance(v, str) else None


def _image_ref(v, root: str):
  """An image field -> bytes or an absolute path (None when unusable)."""
  if isinstance(v, dict):
    v = v.get("bytes") or v.get("path")
  if isinstance(v, (bytes, bytearray)):
    return bytes(v)
  if isinstance(v, str) and v:
    return v if os.path.isabs(v) else os.path.join(root, v)
  return None


# ----------------------------------------------------------------------------- row readers


class _Lines:
  """Random access to the non-blank lines of text files through byte offsets (os.pread)."""

  def __init__(self, path: str):
    self.path = path
    offsets, lengths, pos = [], [], 0
    with open(path, "rb") as f:
      for line in f:
        if line.strip():
          offsets.append(pos)
          lengths.append(len(line))
        pos += len(line)
    self.offsets, self.lengths = np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)
    self._fd = None

  def __len__(self):
    return len(self.offsets)

  def __getitem__(self, i):
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    raw = os.pread(self._fd, int(self.lengths[i]), int(self.offsets[i]))
    try:
      return json.loads(raw)
    except ValueError:
      return None

  def __getstate__(self):
    return {**self.__dict__, "_fd": None}


class _Concat:
  """Several random-access row lists as one."""

  def __init__(self, parts):
    self.parts = parts
    self.ends = np.cumsum([len(p) for p in parts])

  def __len__(self):
    return int(self.ends[-1]) if len(self.ends) else 0

  def __getitem__(self, i):
    k = int(np.searchsorted(self.ends, i, side="right"))
    return self.parts[k][i - (int(self.ends[k - 1]) if k else 0)]


def _JsonRows(files):  # pylint: disable=invalid-name
  parts = []
  for f in files:
    if f.endswith(".jsonl"):
      parts.append(_Lines(f))
    else:
      with open(f) as fh:
        try:
          rows = json.load(fh)
        except ValueError as e:
          raise ValueError(f"{f}: not valid JSON ({e})") from None
      if not isinstance(rows, list):
        raise ValueError(f"{f}: expected a JSON list of records")
      parts.append(rows)
  return _Concat(parts)


class _ParquetRows:
  """Random access to Parquet rows, one cached row group at a time (sequential reads are fast)."""

  def __init__(self, files):
    try:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ValueError("reading Parquet needs pyarrow (pip install pyarrow)") from None
    self.files, groups = files, []
    for fi, f in enumerate(files):
      md = pq.ParquetFile(f).metadata
      groups += [(fi, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
    self.groups = groups
    self.ends = np.cumsum([n for _, _, n in groups])
    self._cache, self._lock = collections.OrderedDict(), threading.Lock()

  def __len__(self):
    return int(self.ends[-1]) if len(self.ends) else 0

  def __getitem__(self, i):
    k = int(np.searchsorted(self.ends, i, side="right"))
    return self._group(k)[i - (int(self.ends[k - 1]) if k else 0)]

  def _group(self, k):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    with self._lock:
      if k in self._cache:
        self._cache.move_to_end(k)
        return self._cache[k]
    fi, g, _ = self.groups[k]
    rows = pq.ParquetFile(self.files[fi]).read_row_group(g).to_pylist()
    with self._lock:
      self._cache[k] = rows
      while len(self._cache) > 2:
        self._cache.popitem(last=False)
    return rows

  def __getstate__(self):
    return {**self.__dict__, "_cache": collections.OrderedDict(), "_lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


# ----------------------------------------------------------------------------- row -> record


class _PairConverter:

  def __init__(self, root, image_key, caption_key):
    self.root = root
    self.image_keys = (image_key,) if image_key else IMAGE_KEYS
    self.caption_keys = (caption_key,) if caption_key else CAPTION_KEYS

  def __call__(self, row):
    image = _image_ref(_first(row, self.image_keys), self.root)
    caption = _as_text(_first(row, self.caption_keys))
    if image is None or caption is None:
      return records.skip("bad_record")
    return records.pair(image, caption)


class _LlavaConverter:

  def __init__(self, root):
    self.root = root

  def __call__(self, row):
    turns = row.get("conversations", row.get("messages"))
    if not isinstance(turns, list):
      return records.skip("bad_record")
    messages = []
    for t in turns:
      if not isinstance(t, dict):
        return records.skip("bad_conversation")
      role = str(t.get("from", t.get("role", ""))).lower()
      content = t.get("value", t.get("content"))
      if role == "system":
        continue
      if role not in _ROLES or not isinstance(content, str):
        return records.skip("bad_conversation")
      messages.append({"role": _ROLES[role], "content": content.replace("<image>", tok_lib.IMAGE)})
    images = row.get("image", row.get("images")) or []
    images = [_image_ref(v, self.root) for v in (images if isinstance(images, list) else [images])]
    if any(v is None for v in images):
      return records.skip("bad_record")
    return records.conversation(images, messages)


class _TextConverter:

  def __init__(self, key):
    self.key = key

  def __call__(self, row):
    txt = _as_text(_lookup(row, self.key))
    return records.skip("bad_record") if txt is None else records.text(txt)


class RowSource:
  """Rows (dicts) of JSON/JSONL/Parquet files converted to records."""

  def __init__(self, rows, convert):
    self.rows, self.convert = rows, convert

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    row = self.rows[i]
    return self.convert(row) if isinstance(row, dict) else records.skip("bad_record")


# ----------------------------------------------------------------------------- other formats


class ArrayRecordSource:
  """Shards written by jfl-prepare / jfl-cache-latents."""

  def __init__(self, path: str):
    import grain  # pylint: disable=g-import-not-at-top
    self.paths = records.shard_paths(path)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    return records.decode(self._source[i])


class WdsSource:
  """WebDataset tar shards, indexed once (member offsets) and read with os.pread."""

  def __init__(self, files: list[str], caption_key: str | None = None):
    self.files, self.caption_keys = files, (caption_key,) if caption_key else CAPTION_KEYS
    self.samples = []  # (file index, {ext: (offset, size)})
    for fi, f in enumerate(files):
      groups = {}
      with tarfile.open(f) as tar:
        for m in tar:
          if m.isfile():
            d, base = os.path.split(m.name)
            key, _, ext = base.partition(".")
            groups.setdefault(os.path.join(d, key), {})[ext.lower()] = (m.offset_data, m.size)
      self.samples += [(fi, g) for g in groups.values()]
    self._fds = {}

  def __len__(self):
    return len(self.samples)

  def _read(self, fi, where):
    fd = self._fds.get(fi)
    if fd is None:
      fd = self._fds[fi] = os.open(self.files[fi], os.O_RDONLY)
    return os.pread(fd, where[1], where[0])

  def __getitem__(self, i):
    fi, parts = self.samples[i]
    img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if img is None:
      return records.skip("bad_record")
    if "txt" in parts:
      caption = self._read(fi, parts["txt"]).decode("utf-8", errors="replace")
    elif "json" in parts:
      try:
        caption = _as_text(_first(json.loads(self._read(fi, parts["json"])), self.caption_keys))
      except ValueError:
        caption = None
    else:
      caption = None
    if caption is None:
      return records.skip("bad_record")
    return records.pair(self._read(fi, img), caption)

  def __getstate__(self):
    return {**self.__dict__, "_fds": {}}


class TfdsSource:
  """A prepared TFDS dataset (`tfds.data_source`, ArrayRecord files; images kept encoded)."""

  def __init__(self, name, data_dir, split="train", image_key="image", caption_key=None):
    self.args = (name, data_dir, split, image_key)
    self.image_key = image_key
    self.caption_keys = (caption_key,) if caption_key else CAPTION_KEYS
    self._source = self._open()

  def _open(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    name, data_dir, split, image_key = self.args
    try:
      return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                              decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # tfds raises many types (DatasetNotFoundError, AssertionError, ...)
      raise ValueError(f"tfds dataset {name!r} (split {split!r}) not found or not readable in {data_dir}: "
                       f"{type(e).__name__}: {e}") from None

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    row = self._source[i]
    image = row.get(self.image_key)
    caption = _as_text(_first(row, self.caption_keys))
    if not isinstance(image, bytes) or caption is None:
      return records.skip("bad_record")
    return records.pair(image, caption)

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._source = self._open()


_ORDERS = tuple(lambda c, o=o: [c[k] for k in o] for o in itertools.permutations(range(3)))


class ShapesSource:
  """The embedded shapes dataset as records: images PNG-encoded like any file source."""

  def __init__(self, split: str, task: str, seed: int, n: int, size: int):
    from jfl.demo import shapes  # pylint: disable=g-import-not-at-top
    if task not in ("und", "gen", "text"):
      raise ValueError(f"shapes source: task={task!r}, expected und, gen or text")
    self.task = task
    self.dataset = shapes.ShapesDataset(split, seed, n, size)

  def __len__(self):
    return len(self.dataset)

  def __getitem__(self, i):
    ex = self.dataset[i]
    if self.task == "text":
      return records.text(ex.text)
    buf = io.BytesIO()
    Image.fromarray(ex.image).save(buf, format="PNG")
    if self.task == "gen":
      return records.pair(buf.getvalue(), ex.caption)
    (q0, a0), *rest = _ORDERS[i % len(_ORDERS)](ex.conversations)  # every question also asked first
    messages = [{"role": "User", "content": f"{tok_lib.IMAGE}\n{q0}"}, {"role": "Assistant", "content": a0}]
    for q, a in rest:
      messages += [{"role": "User", "content": q}, {"role": "Assistant", "content": a}]
    return records.conversation([buf.getvalue()], messages)
