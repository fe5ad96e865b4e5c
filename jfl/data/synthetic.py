"""Random packed batches in the jfl/batch.py layout (for tests, benchmarks and smoke runs).

Every row packs examples back to back until the next one does not fit: understanding
([BOS, prompt, BOI, P x IMG, EOI, question, response, EOS], loss on the response and EOS),
generation ([BOS, prompt, T_EMB, P x latent]) and text-only ([BOS, text], loss on all of it), drawn
with the mix weights (und, gen, text) while image slots remain. Token ids are random in
[FIRST_WORD, vocab); images are uniform in [-1, 1]. Batch `i` is a pure function of (seed, i), and
each process builds only its own rows, so the global batch does not depend on the process count.
"""

import grain
import numpy as np

from jfl import batch as batch_lib
from jfl.models.config import JanusFlowConfig

PAD, BOS, EOS, IMG, BOI, EOI = 0, 1, 2, 3, 4, 5
FIRST_WORD = 8


def _und(rng, p: int):
  prompt, question, response = (rng.integers(FIRST_WORD, 1 << 30, n) for n in rng.integers(2, 6, 3))
  ids = np.concatenate([[BOS], prompt, [BOI], np.full(p, IMG), [EOI], question, response, [EOS]])
  start = 1 + len(prompt)
  slot = np.zeros(len(ids), bool)
  slot[start:start + p + 1] = True
  resp = len(ids) - len(response) - 1              # first response token
  return ids, batch_lib.TASK_UND, slot, resp


def _gen(rng, p: int):
  prompt = rng.integers(FIRST_WORD, 1 << 30, rng.integers(2, 8))
  ids = np.concatenate([[BOS], prompt, np.full(p + 1, PAD)])
  slot = np.zeros(len(ids), bool)
  slot[1 + len(prompt):] = True
  return ids, batch_lib.TASK_GEN, slot, None


def _text(rng, p: int):
  del p
  ids = np.concatenate([[BOS], rng.integers(FIRST_WORD, 1 << 30, rng.integers(4, 24))])
  return ids, batch_lib.TASK_TEXT, np.zeros(len(ids), bool), 1


def synthetic_rows(cfg: JanusFlowConfig, rows: range, seq_len: int, *, seed: int, index: int, num_und: int = 1,
                   num_gen: int = 1, mix=(1.0, 1.0, 1.0), cached_latents: bool = False,
                   cached_repa: bool = True) -> dict:
  """Rows `rows` of global batch `index` as a numpy batch (keys of `jfl.batch.batch_shapes`).

  `mix`: (und, gen, text) example weights; a type is drawn only while its image slots last.
  """
  p, s, size = cfg.num_image_tokens, seq_len, cfg.image_size
  vocab = cfg.llm.vocab_size
  latent = (cfg.latent_size, cfg.latent_size, cfg.vae.latent_channels)
  shapes = batch_lib.batch_shapes(len(rows), s, size, num_und, num_gen, latent if cached_latents else None,
                                  (p, cfg.siglip.width))
  if cached_latents and not cached_repa:
    del shapes["gen_repa_target"]
  out = {k: np.zeros(v.shape, v.dtype) for k, v in shapes.items()}
  out["gen_prompt_slot"][:] = -1
  mix = np.asarray(mix, np.float64)
  for r, row in enumerate(rows):
    rng = np.random.default_rng([seed, index, row])
    pos, seg, nu, ngen = 0, 0, 0, 0
    while True:
      w = mix * [nu < num_und, ngen < num_gen, True]
      if w.sum() <= 0:
        break
      ids, task, slot, loss_from = (_und, _gen, _text)[rng.choice(3, p=w / w.sum())](rng, p)
      ids = np.where(ids >= FIRST_WORD, FIRST_WORD + ids % max(vocab - FIRST_WORD, 1), ids)
      if pos + len(ids) > s:
        break
      seg += 1
      sl = slice(pos, pos + len(ids))
      out["tokens"][r, sl] = ids
      out["positions"][r, sl] = np.arange(len(ids))
      out["segment_ids"][r, sl] = seg
      out["targets"][r, pos:pos + len(ids) - 1] = ids[1:]
      out["task"][r, sl] = task
      if loss_from is not None:  # position i predicts token i + 1
        out["loss_mask"][r, pos + loss_from - 1:pos + len(ids) - 1] = 1.0
      if task == batch_lib.TASK_UND:
        out["und_slot_mask"][r, sl] = slot
        out["und_images"][r, nu] = rng.uniform(-1, 1, (size, size, 3))
        out["und_valid"][r, nu] = True
        nu += 1
      elif task == batch_lib.TASK_GEN:
        out["gen_slot_mask"][r, sl] = slot
        out["gen_prompt_slot"][r, pos + 1:pos + int(np.argmax(slot))] = ngen
        if cached_latents:
          out["gen_latents"][r, ngen] = rng.normal(size=latent)
          if cached_repa:
            out["gen_repa_target"][r, ngen] = rng.normal(size=(p, cfg.siglip.width))
        else:
          out["gen_images"][r, ngen] = rng.uniform(-1, 1, (size, size, 3))
        out["gen_valid"][r, ngen] = True
        ngen += 1
      pos += len(ids)
  return out


def make_iterator(config, process_index: int = 0, process_count: int = 1):
  """A Grain iterator (get_state/set_state) over this process's rows of synthetic global batches.

  Reads config.model and config.data: batch_size (global rows), seq_len, seed, mix_schedule
  (batch i uses the weights of step i), max_{und,gen}_images_per_row, cached_latents, cached_repa
  and synthetic_fixed (every batch is batch 0: a fixed batch to overfit).
  """
  from jfl.data import packing, pipeline  # pylint: disable=g-import-not-at-top
  d = config.data
  cfg = JanusFlowConfig.from_dict(config.model.to_dict())
  if d.batch_size % process_count:
    raise ValueError(f"data.batch_size {d.batch_size} is not divisible by {process_count} processes")
  per = d.batch_size // process_count
  rows = range(process_index * per, (process_index + 1) * per)
  nu, ng = pipeline.image_slots(config)
  schedule = packing.parse_schedule(d.mix_schedule)

  def make(i):
    i = 0 if d.synthetic_fixed else int(i)
    return synthetic_rows(cfg, rows, d.seq_len, seed=d.seed, index=i, num_und=nu, num_gen=ng,
                          mix=packing.weights_at(schedule, i), cached_latents=d.cached_latents,
                          cached_repa=d.cached_repa)

  ds = grain.MapDataset.range(1 << 40).map(make)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
