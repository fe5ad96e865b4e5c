"""Mixing the three data types on a step schedule and packing examples into the batch of `jfl/batch.py`.

`MixPackIterDataset` draws examples one at a time: the data type from the schedule's weights at the
current global step (a seeded uniform per draw), the example from that type's Grain iterator. Each
example goes into the first row of the batch with room for its tokens and image slots (first fit);
the first example that fits nowhere closes the batch and opens the next one, so no example is dropped
or truncated (so after a schedule change, the one example drawn last under the old weights still
opens the next batch). Skipped records ({"skip": reason}) are redrawn from the same type and counted.
With Grain worker processes, worker w of W builds global steps w, w + W, ... (for the schedule).

Iterator state (JSON): batches emitted, draws made, each type's parent state and the type of the
pending example; the pending example's parent state is taken from before it was read, so a restored
iterator re-reads it and produces exactly the same batches.
"""

import grain
import numpy as np

from jfl import batch as batch_lib
from jfl.data import records
from jfl.data.transforms import DATA_TYPES

STATS = "stats/"  # per-batch counters, removed from the batch by `CountingIterDataset`
MAX_CONSECUTIVE_SKIPS = 10000


def parse_schedule(schedule: str) -> list[tuple[int, tuple[float, float, float]]]:
  """"0=30:50:20,10000=14:80:6" -> [(0, (.3, .5, .2)), (10000, (.14, .8, .06))] (und:gen:text from a step)."""
  out = []
  try:
    for part in schedule.replace(" ", "").split(","):
      step, ratio = part.split("=")
      w = tuple(float(v) for v in ratio.split(":"))
      if len(w) != 3 or min(w) < 0 or sum(w) <= 0:
        raise ValueError
      out.append((int(step), tuple(v / sum(w) for v in w)))
  except ValueError:
    raise ValueError(f"mix schedule {schedule!r}: expected STEP=UND:GEN:TEXT[,STEP=...] with non-negative "
                     "weights, e.g. 0=30:50:20,10000=14:80:6") from None
  steps = [s for s, _ in out]
  if steps[0] != 0 or steps != sorted(set(steps)):
    raise ValueError(f"mix schedule {schedule!r}: steps must start at 0 and increase")
  return out


def weights_at(schedule, step: int) -> tuple[float, float, float]:
  return next(w for s, w in reversed(schedule) if step >= s)


class BatchBuilder:
  """First-fit packing of examples into B rows of S tokens with NU / NG image slots per row."""

  def __init__(self, rows: int, seq_len: int, num_und: int, num_gen: int, image_size: int, pad_id: int,
               latent_shape=None, repa_shape=None):
    b, s, hw = rows, seq_len, (image_size, image_size, 3)
    self.s, self.nu, self.ng = s, num_und, num_gen
    self.used, self.n_und, self.n_gen = np.zeros(b, int), np.zeros(b, int), np.zeros(b, int)
    self.nseg = np.zeros(b, int)
    self.batch = {
        "tokens": np.full((b, s), pad_id, np.int32), "positions": np.zeros((b, s), np.int32),
        "segment_ids": np.zeros((b, s), np.int32), "targets": np.zeros((b, s), np.int32),
        "loss_mask": np.zeros((b, s), np.float32), "task": np.zeros((b, s), np.int32),
        "und_images": np.zeros((b, num_und, *hw), np.float32), "und_valid": np.zeros((b, num_und), bool),
        "und_slot_mask": np.zeros((b, s), bool), "gen_valid": np.zeros((b, num_gen), bool),
        "gen_slot_mask": np.zeros((b, s), bool), "gen_prompt_slot": np.full((b, s), -1, np.int32),
    }
    if latent_shape is None:
      self.batch["gen_images"] = np.zeros((b, num_gen, *hw), np.float32)
    else:
      self.batch["gen_latents"] = np.zeros((b, num_gen, *latent_shape), np.float32)
      if repa_shape is not None:
        self.batch["gen_repa_target"] = np.zeros((b, num_gen, *repa_shape), np.float32)

  def add(self, ex: dict) -> bool:
    """Places `ex` in the first row with room; False when none has."""
    n = len(ex["tokens"])
    k_und = len(ex.get("und_images", ()))
    k_gen = int("gen_slots" in ex)
    fits = (self.used + n <= self.s) & (self.n_und + k_und <= self.nu) & (self.n_gen + k_gen <= self.ng)
    if not fits.any():
      return False
    r = int(np.argmax(fits))
    o, bt = self.used[r], self.batch
    sl = slice(o, o + n)
    self.nseg[r] += 1
    bt["tokens"][r, sl] = ex["tokens"]
    bt["positions"][r, sl] = np.arange(n)
    bt["segment_ids"][r, sl] = self.nseg[r]
    bt["targets"][r, o:o + n - 1] = ex["tokens"][1:]
    bt["task"][r, sl] = ex["task"]
    if "response" in ex:
      bt["loss_mask"][r, o:o + n - 1] = ex["response"][1:]
    if k_und:
      bt["und_slot_mask"][r, sl] = ex["und_slots"]
      j = self.n_und[r]
      bt["und_images"][r, j:j + k_und] = ex["und_images"]
      bt["und_valid"][r, j:j + k_und] = True
    if k_gen:
      j = self.n_gen[r]
      bt["gen_slot_mask"][r, sl] = ex["gen_slots"]
      bt["gen_prompt_slot"][r, sl] = np.where(ex["prompt"], j, -1)
      bt["gen_valid"][r, j] = True
      if "gen_image" in ex:
        bt["gen_images"][r, j] = ex["gen_image"]
      else:
        bt["gen_latents"][r, j] = ex["gen_latent"]
        if "gen_repa_target" in bt:
          bt["gen_repa_target"][r, j] = ex["gen_repa"]
    self.used[r] += n
    self.n_und[r] += k_und
    self.n_gen[r] += k_gen
    return True


class MixPackIterDataset(grain.IterDataset):
  """Mixes per-type example datasets on a step schedule and packs them into batches.

  Args:
    parents: {data type: IterDataset of examples} for the types that have sources.
    schedule: `parse_schedule` output.
    make_builder: () -> a fresh `BatchBuilder`.
    seed, host: seed of the type draws, folded with the host (process) index and the worker index.
    start_step: global step of the first batch (only shifts the schedule).
  """

  def __init__(self, parents: dict, schedule, make_builder, seed: int = 0, host: int = 0, start_step: int = 0):
    super().__init__(list(parents.values()))
    self.types = list(parents)
    self.schedule, self.make_builder = schedule, make_builder
    self.seed, self.host, self.start_step = seed, host, start_step
    for step, w in schedule:
      for t, wt in zip(DATA_TYPES, w):
        if wt > 0 and t not in parents:
          raise ValueError(f"mix schedule gives {t} weight {wt:.2f} from step {step} but there are no {t} sources")

  def __iter__(self):
    return _MixPackIterator(self, [iter(p) for p in self.parents])

  def __str__(self):
    return f"MixPackIterDataset(types={self.types}, schedule={self.schedule})"


class _MixPackIterator(grain.DatasetIterator):

  def __init__(self, ds: MixPackIterDataset, parents):
    super().__init__(parents)
    self.ds = ds
    self.step = self.draws = 0
    self.pending = None  # (type index, example, parent state before it was read)

  def _worker(self) -> tuple[int, int]:
    ctx = self._ctx.mp_context
    return ctx.process_index, ctx.process_count

  def _choose(self, global_step: int, worker: int) -> int:
    w = weights_at(self.ds.schedule, global_step)
    w = np.asarray([w[DATA_TYPES.index(t)] for t in self.ds.types])
    u = np.random.default_rng((self.ds.seed, self.ds.host, worker, self.draws)).random()
    self.draws += 1
    return min(int(np.searchsorted(np.cumsum(w) / w.sum(), u, side="right")), len(w) - 1)

  def _pull(self, k: int, counts: dict):
    """The next usable example of type k and the parent state before it; skips are counted."""
    it = self._parents[k]
    for _ in range(MAX_CONSECUTIVE_SKIPS):
      state = it.get_state()
      ex = next(it)
      if "skip" not in ex:
        return ex, state
      counts[ex["skip"]] += 1
    raise RuntimeError(f"{MAX_CONSECUTIVE_SKIPS} consecutive {self.ds.types[k]} records were skipped "
                       f"({ {r: c for r, c in counts.items() if c} }); check the sources and config.data")

  def __next__(self) -> dict:
    worker, workers = self._worker()
    global_step = self.ds.start_step + self.step * workers + worker
    builder = self.ds.make_builder()
    counts = dict.fromkeys(records.SKIP_REASONS, 0)
    if self.pending is not None:
      ok = builder.add(self.pending[1])
      assert ok, "an example that fits an empty row did not"
      self.pending = None
    while True:
      k = self._choose(global_step, worker)
      ex, state = self._pull(k, counts)
      if not builder.add(ex):
        self.pending = (k, ex, state)
        break
    self.step += 1
    out = builder.batch
    for r, c in counts.items():
      out[f"{STATS}skipped/{r}"] = np.int64(c)
    for t, code in zip(DATA_TYPES, (batch_lib.TASK_UND, batch_lib.TASK_GEN, batch_lib.TASK_TEXT)):
      starts = (out["positions"] == 0) & (out["segment_ids"] > 0) & (out["task"] == code)
      out[f"{STATS}examples/{t}"] = np.int64(starts.sum())
    out[f"{STATS}tokens"] = np.int64((out["segment_ids"] > 0).sum())
    return out

  def get_state(self) -> dict:
    states = [p.get_state() for p in self._parents]
    pending = None
    if self.pending is not None:
      pending = self.pending[0]
      states[pending] = self.pending[2]
    return {"step": self.step, "draws": self.draws, "pending": pending, "parents": states}

  def set_state(self, state: dict) -> None:
    for p, s in zip(self._parents, state["parents"]):
      p.set_state(s)
    self.step, self.draws = state["step"], state["draws"]
    self.pending = None
    if state["pending"] is not None:
      k = state["pending"]
      ex, st = self._pull(k, dict.fromkeys(records.SKIP_REASONS, 0))
      self.pending = (k, ex, st)

  def __str__(self):
    return f"MixPackIterator(step={self.step})"


class CountingIterDataset(grain.IterDataset):
  """Removes the `stats/...` counters from each batch and keeps running totals in the iterator state."""

  def __iter__(self):
    return CountingIterator(iter(self._parent))


class CountingIterator(grain.DatasetIterator):
  """Batches exactly in the layout of `jfl/batch.py`; `counts()` / `skip_counts()` give running totals."""

  def __init__(self, parent):
    super().__init__(parent)
    self.totals = {}

  def __next__(self) -> dict:
    batch = next(self._parent)
    for key in [k for k in batch if k.startswith(STATS)]:
      name = key[len(STATS):]
      self.totals[name] = self.totals.get(name, 0) + int(batch.pop(key))
    return batch

  def counts(self) -> dict[str, int]:
    """Totals since the start of training (restored with the state): skipped/<reason>, examples/<type>,
    tokens (non-padding)."""
    return dict(self.totals)

  def skip_counts(self) -> dict[str, int]:
    return {k.split("/", 1)[1]: v for k, v in self.totals.items() if k.startswith("skipped/")}

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "totals": dict(self.totals)}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self.totals = dict(state["totals"])
