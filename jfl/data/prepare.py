"""Converting any source into self-contained ArrayRecord shards (what `jfl-prepare` runs).

Images referenced by path are read and embedded as bytes; with `verify_images` each one is fully
decoded once, so truncated or corrupt files are dropped here rather than during training. Records
that cannot be used are counted by reason (`records.SKIP_REASONS`) and listed in `summary.json`.
"""

import collections
import concurrent.futures
import json
import os

from jfl.data import records, sources, transforms


def normalize(record: dict, verify_images: bool = True) -> dict:
  """A record with images embedded as bytes, or a skip record naming why it cannot be used."""
  kind = record["kind"]
  try:
    if kind == records.PAIR:
      if not record["caption"].strip():
        raise transforms.Skip("empty_caption")
      return records.pair(_image_bytes(record["image"], verify_images), record["caption"])
    if kind == records.CONVERSATION:
      transforms._check_turns(record["messages"])  # pylint: disable=protected-access
      return records.conversation([_image_bytes(i, verify_images) for i in record["images"]], record["messages"])
    if kind == records.TEXT and not record["text"].strip():
      raise transforms.Skip("empty_text")
    if kind == records.LATENT and not record["caption"].strip():
      raise transforms.Skip("empty_caption")
  except transforms.Skip as s:
    return records.skip(s.reason)
  return record


def _image_bytes(ref, verify: bool) -> bytes:
  if isinstance(ref, str):
    try:
      with open(ref, "rb") as f:
        ref = f.read()
    except OSError:
      raise transforms.Skip("missing_image") from None
  if verify:
    transforms.open_image(ref)
  return ref


class RecordReader:
  """The records of several sources (this shard's i::n indices, at most `limit`), read in order with threads."""

  def __init__(self, specs: list[str], shard: tuple[int, int] = (0, 1), limit: int | None = None):
    if not 0 <= shard[0] < shard[1]:
      raise ValueError(f"shard {shard[0]}/{shard[1]}: expected INDEX/COUNT with 0 <= INDEX < COUNT")
    self.sources = [sources.open_source(s) for s in specs]
    index = [(k, i) for k, src in enumerate(self.sources) for i in range(shard[0], len(src), shard[1])]
    self.index = index[:limit] if limit is not None else index

  def __len__(self):
    return len(self.index)

  def map(self, fn, threads: int = 8):
    """Yields fn(position, record) in order."""
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
      for start in range(0, len(self.index), 256):
        chunk = self.index[start:start + 256]
        yield from pool.map(lambda pos: fn(pos, self.sources[self.index[pos][0]][self.index[pos][1]]),
                            range(start, start + len(chunk)))


def prepare(specs: list[str], out_dir: str, *, records_per_shard: int = 10000, verify_images: bool = True,
            threads: int = 8, limit: int | None = None, progress=None) -> dict:
  """Writes the usable records of `specs` to `out_dir`; returns (and saves) the summary.

  `progress(n, total)` is called with the number of records handled since the last call.
  """
  counts = collections.Counter()
  reader = RecordReader(specs, limit=limit)
  with records.ShardWriter(out_dir, records_per_shard) as writer:
    for rec in reader.map(lambda _, r: normalize(r, verify_images), threads):
      if rec["kind"] == records.SKIP:
        counts[rec["reason"]] += 1
      else:
        counts[f"kind/{rec['kind']}"] += 1
        writer.write(rec)
      if progress:
        progress(1, len(reader))
  summary = {"sources": specs, "records_read": len(reader), "written": writer.num_records,
             "skipped": {r: counts[r] for r in records.SKIP_REASONS if counts[r]},
             "kinds": {k[5:]: v for k, v in counts.items() if k.startswith("kind/")}, "shards": len(writer.paths)}
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
