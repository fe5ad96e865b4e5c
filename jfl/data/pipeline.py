"""The training input pipeline: sources -> preprocessing -> mixing -> packing -> host-local batches.

    it = make_train_iterator(config, tokenizer, jax.process_index(), jax.process_count())
    batch = next(it)            # numpy, exactly the layout of jfl/batch.py, config.data.batch_size // P rows
    it.get_state() / it.set_state(state)     # JSON; save with grain.checkpoint.CheckpointSave(it)
    it.skip_counts()            # {reason: n} records skipped so far on this host (also it.counts())

Per data type (understanding, generation, text-only) every source is a Grain `MapDataset`: the
process's shard (`ds[process_index::process_count]`, disjoint across hosts), a global shuffle
reshuffled every epoch, repeated forever, then `transforms.Preprocess` (decode, the reference
preprocessing, tokenisation) in `read_threads` threads; sources of one type are mixed by their
`weight=`. `packing.MixPackIterDataset` draws the type of each example from the mix schedule and
packs examples into rows (first fit); `num_workers` > 0 runs all of that in worker processes
(`mp_prefetch`), otherwise a thread prefetches `prefetch` batches.

config.data fields (`default_data_config()`):
  und_sources, gen_sources, text_sources   ';'-separated source specs (`jfl.data.sources`), e.g.
                               "arrayrecord:/data/llava_prepared;arrayrecord:/data/captions?weight=2"
  mix_schedule                 "STEP=UND:GEN:TEXT,..." example ratios from each step (paper stage 2:
                               "0=30:50:20,10000=14:80:6"; stage 1 "0=50:50:0"; stage 3 "0=21:70:9")
  seq_len, batch_size          packed row length (4096) and GLOBAL rows per step (512)
  max_und_images_per_row       understanding / generation image slots per row (NU, NG);
  max_gen_images_per_row         0 = seq_len // (P + 10)
  caption_prompt               the question of caption pairs used as understanding data
  cached_latents, cached_repa  generation sources are jfl-cache-latents output: batches carry
                               gen_latents (+ gen_repa_target when cached_repa) instead of gen_images
  seed, shuffle                data order (the same seed and state give the same batches)
  num_workers, worker_buffer_size   decoding processes (0 = in this process) and batches each buffers
  read_threads, read_buffer_size    threads and example buffer of each source
  prefetch                     batches prefetched by a thread when num_workers == 0
Image size and P (image tokens) come from config.model (the architecture).
"""

import functools

from absl import flags
import grain
import jax
import ml_collections

from jfl import batch as batch_lib
from jfl import tokenizer as tok_lib
from jfl.config_utils import split_list
from jfl.data import packing, sources, transforms
from jfl.models.config import JanusFlowConfig


def default_data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.und_sources = ""
  c.gen_sources = ""
  c.text_sources = ""
  c.mix_schedule = "0=30:50:20,10000=14:80:6"
  c.seq_len = 4096
  c.batch_size = 512
  c.max_und_images_per_row = 0
  c.max_gen_images_per_row = 0
  c.caption_prompt = "Describe this image in detail."
  c.cached_latents = False
  c.cached_repa = True
  c.seed = 0
  c.shuffle = True
  c.num_workers = 0
  c.worker_buffer_size = 2
  c.read_threads = 4
  c.read_buffer_size = 64
  c.prefetch = 2
  return c


def _arch(config) -> JanusFlowConfig:
  if "model" not in config or "data" not in config:
    raise ValueError("the config needs `model` (architecture) and `data` (see jfl.data.pipeline) sections")
  model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  return JanusFlowConfig.from_dict(model)


def image_slots(config) -> tuple[int, int]:
  """(NU, NG): image slots per row."""
  d, p = config.data, _arch(config).num_image_tokens
  auto = max(1, d.seq_len // (p + 10))
  return d.max_und_images_per_row or auto, d.max_gen_images_per_row or auto


def _cache_shapes(config):
  arch = _arch(config)
  if not config.data.cached_latents:
    return None, None
  latent = (arch.latent_size, arch.latent_size, arch.vae.latent_channels)
  return latent, ((arch.num_image_tokens, arch.siglip.width) if config.data.cached_repa else None)


def batch_spec(config, batch_size: int | None = None) -> dict:
  """ShapeDtypeStructs of a batch (default: the global batch of config.data.batch_size rows)."""
  d, arch = config.data, _arch(config)
  nu, ng = image_slots(config)
  latent, repa = _cache_shapes(config)
  out = batch_lib.batch_shapes(batch_size or d.batch_size, d.seq_len, arch.image_size, nu, ng,
                               latent, (repa or (1, 1)) if latent else None)
  if latent and not repa:
    del out["gen_repa_target"]
  return out


def _type_dataset(t: str, specs: list[str], prep, d, process_index: int, process_count: int) -> grain.IterDataset:
  """One data type's examples: each source sharded, shuffled, repeated, preprocessed; mixed by weight."""
  its, weights = [], []
  for i, spec in enumerate(specs):
    weight = sources.spec_weight(spec)
    if weight == 0:
      continue
    src = sources.open_source(spec)
    if len(src) < process_count:
      raise ValueError(f"data source {spec!r} has {len(src)} records, fewer than the {process_count} processes")
    ds = grain.MapDataset.source(src)[process_index::process_count]
    ds = ds.seed(d.seed * 1000 + transforms.DATA_TYPES.index(t) * 100 + i)
    if d.shuffle:
      ds = ds.shuffle()
    ds = ds.repeat().random_map(prep)
    its.append(ds.to_iter_dataset(grain.ReadOptions(num_threads=d.read_threads,
                                                    prefetch_buffer_size=d.read_buffer_size)))
    weights.append(weight)
  if not its:
    raise ValueError(f"{t}_sources: every source has weight 0")
  return its[0] if len(its) == 1 else grain.IterDataset.mix(its, weights)


def make_train_iterator(config, tokenizer, process_index: int = 0, process_count: int = 1,
                        start_step: int = 0) -> packing.CountingIterator:
  """The host-local batch iterator (Grain, checkpointable) of `config` (see the module docstring).

  Args:
    config: a ConfigDict with `model` (architecture fields) and `data` (`default_data_config()`).
    tokenizer: a HF fast tokenizer with the JanusFlow special tokens.
    process_index, process_count: this host's shard of every source.
    start_step: global step of the first batch, for the mix schedule when no iterator state is restored.
  Returns:
    An iterator of numpy batches of config.data.batch_size // process_count rows.
  """
  d, arch = config.data, _arch(config)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
  if d.batch_size % process_count:
    raise ValueError(f"data.batch_size {d.batch_size} is not divisible by the {process_count} processes")
  p = arch.num_image_tokens
  if d.seq_len < p + 8:
    raise ValueError(f"data.seq_len {d.seq_len} cannot hold one image ({p} tokens) and its prompt")
  tok_lib.special_ids(tokenizer)  # fails early, naming a missing special token
  nu, ng = image_slots(config)
  latent, repa = _cache_shapes(config)
  spec = transforms.ExampleSpec(d.seq_len, arch.image_size, p, nu, d.caption_prompt, bool(latent), latent, repa)
  parents = {}
  for t in transforms.DATA_TYPES:
    specs = split_list(d[f"{t}_sources"])
    if specs:
      parents[t] = _type_dataset(t, specs, transforms.Preprocess(t, tokenizer, spec), d, process_index, process_count)
  pad = tok_lib.special_ids(tokenizer).pad
  builder = functools.partial(packing.BatchBuilder, d.batch_size // process_count, d.seq_len, nu, ng,
                              arch.image_size, pad, latent, repa)
  ds = packing.MixPackIterDataset(parents, packing.parse_schedule(d.mix_schedule), builder, d.seed,
                                  process_index, start_step)
  if d.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain's worker code reads absl flags; keep their defaults
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers,
                                                     per_worker_buffer_size=d.worker_buffer_size))
  elif d.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=d.prefetch)
  return iter(packing.CountingIterDataset(ds))


def make_global_batch(batch: dict, sharding) -> dict:
  """Host-local numpy batch -> global jax.Arrays (`jax.make_array_from_process_local_data` per key).

  `sharding`: one `jax.sharding.Sharding` for every key, or a dict of them.
  """
  return {k: jax.make_array_from_process_local_data(sharding[k] if isinstance(sharding, dict) else sharding, v)
          for k, v in batch.items()}
