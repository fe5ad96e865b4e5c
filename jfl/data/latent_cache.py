"""Offline generation cache (what `jfl-cache-latents` runs): SDXL-VAE latents and SigLIP REPA targets.

Each image-caption pair is decoded and given the generation preprocessing once (short side to the
model's resolution, a random square crop seeded by (seed, shard, position)), then encoded by the frozen
VAE (scaled posterior mean, float32 [h, w, 4]) and, with `repa`, the frozen SigLIP tower (the clean
image's features, float16 [P, C]). Records: {"kind": "latent", "caption", "latent", "repa"}. Training
with `config.data.cached_latents=True` reads them instead of images (one fixed crop per image).
"""

import collections
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jfl import checkpoint, processor
from jfl.data import records, transforms
from jfl.data.prepare import RecordReader
from jfl.models import siglip as siglip_lib
from jfl.models import vae as vae_lib


def make_encoder(config, params, vae_params, repa: bool = True, dtype: str = "float32"):
  """images float32 [B, H, W, 3] in [-1, 1] (B a multiple of the local device count) ->
  (scaled latents [B, h, w, c], SigLIP features [B, P, C] or None), numpy, data-parallel over local devices."""
  dt = jnp.dtype(dtype)
  vae = vae_lib.make_codec(config.vae, dtype=dt)
  tower = siglip_lib.SiglipEncoder(config.siglip, dtype=dt)
  mesh = jax.make_mesh((jax.local_device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.local_devices())
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  vae_params = jax.device_put(vae_params, replicated)
  sig_params = jax.device_put(params["siglip"], replicated) if repa else None

  @jax.jit
  def encode(vp, sp, x):
    mean, _ = vae.apply({"params": vp}, x.astype(dt), method=vae.encode)
    lat = vae_lib.scale_latents(mean.astype(jnp.float32), config.vae)
    feats = tower.apply({"params": sp}, x.astype(dt)).astype(jnp.float32) if repa else None
    return lat, feats

  def run(images: np.ndarray):
    lat, feats = encode(vae_params, sig_params, jax.device_put(images, data))
    return np.asarray(lat), None if feats is None else np.asarray(feats)

  return run


def _load(ckpt_dir: str):
  if not checkpoint.is_converted(ckpt_dir):
    raise ValueError(f"{ckpt_dir}: not a converted jfl checkpoint (no {checkpoint.CONFIG_FILE}); run jfl-convert")
  config, params, vae_params = checkpoint.load_converted(ckpt_dir)
  if vae_params is None:
    raise ValueError(f"{ckpt_dir}: has no VAE; convert with jfl-convert --vae-dir (SDXL-VAE)")
  return config, params, vae_params


def cache_latents(specs: list[str], ckpt_dir: str, out_dir: str, *, batch_size: int = 32, repa: bool = True,
                  seed: int = 0, dtype: str = "float32", shard: tuple[int, int] = (0, 1), threads: int = 8,
                  records_per_shard: int = 10000, limit: int | None = None, progress=None) -> dict:
  """Encodes the image-caption pairs of `specs` into `out_dir`; returns (and saves) the summary.

  `progress(n, total)` is called with the number of records handled since the last call.
  """
  config, params, vae_params = _load(ckpt_dir)
  size, ndev = config.image_size, jax.local_device_count()
  batch_size = -(-batch_size // ndev) * ndev
  encoder = make_encoder(config, params, vae_params, repa, dtype)
  reader = RecordReader(specs, shard, limit)
  counts = collections.Counter()

  def load(pos, rec):
    try:
      if rec["kind"] == records.SKIP:
        raise transforms.Skip(rec["reason"])
      if rec["kind"] != records.PAIR:
        raise transforms.Skip("wrong_kind")
      if not rec["caption"].strip():
        raise transforms.Skip("empty_caption")
      rng = np.random.default_rng((seed, shard[0], pos))
      return rec["caption"], processor.generation_image(transforms.open_image(rec["image"]), size, rng)
    except transforms.Skip as s:
      return s.reason

  def flush(pending, writer):
    if not pending:
      return
    images = np.zeros((batch_size, size, size, 3), np.float32)
    images[:len(pending)] = [im for _, im in pending]
    lat, feats = encoder(images)
    for i, (caption, _) in enumerate(pending):
      writer.write(records.latent(caption, lat[i], None if feats is None else feats[i].astype(np.float16)))
    if progress:
      progress(len(pending), len(reader))
    pending.clear()

  with records.ShardWriter(out_dir, records_per_shard) as writer:
    pending = []
    for item in reader.map(load, threads):
      if isinstance(item, str):
        counts[item] += 1
        if progress:
          progress(1, len(reader))
        continue
      pending.append(item)
      if len(pending) == batch_size:
        flush(pending, writer)
    flush(pending, writer)
  summary = {"sources": specs, "checkpoint": ckpt_dir, "records_read": len(reader), "written": writer.num_records,
             "skipped": {r: counts[r] for r in records.SKIP_REASONS if counts[r]}, "repa": repa,
             "image_size": size, "shards": len(writer.paths)}
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
