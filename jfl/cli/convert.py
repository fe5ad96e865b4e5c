"""jfl-convert: HF JanusFlow (+ diffusers VAE) -> jfl Orbax checkpoint; jfl-export: the reverse.

  jfl-convert --model-dir JanusFlow-1.3B --vae-dir sdxl-vae --out ckpt/janusflow
  jfl-export --ckpt ckpt/janusflow --out hf_export [--vae-out hf_export_vae] [--dtype bfloat16]
"""

import argparse
import os
import shutil

from tqdm import tqdm

from jfl import checkpoint
from jfl.cli.common import friendly_errors
from jfl.convert import hf, mapping
from jfl.models.config import VAEConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "processor_config.json", "preprocessor_config.json")


@friendly_errors("jfl-convert")
def main(argv=None):
  ap = argparse.ArgumentParser(prog="jfl-convert", description=__doc__.splitlines()[0])
  ap.add_argument("--model-dir", required=True, help="HF-layout JanusFlow directory (config.json + weights)")
  ap.add_argument("--vae-dir", help="diffusers-layout AutoencoderKL directory (e.g. stabilityai/sdxl-vae)")
  ap.add_argument("--out", required=True, help="output directory (Orbax checkpoint + config + tokenizer)")
  args = ap.parse_args(argv)

  vae_cfg, vae_params = VAEConfig(), None
  if args.vae_dir:
    with tqdm(desc="VAE tensors", unit="t") as bar:
      vae_cfg, vae_params = hf.load_vae(args.vae_dir, progress=bar.update)
  cfg = hf.config_from_hf(hf.read_json(os.path.join(args.model_dir, "config.json")), vae_cfg)
  with tqdm(total=len(mapping.janusflow_rules(cfg)), desc="JanusFlow tensors", unit="t") as bar:
    cfg, params = hf.load_janusflow(args.model_dir, vae_cfg, progress=bar.update)
  checkpoint.save_converted(args.out, cfg, params, vae_params)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(args.model_dir, name)):
      shutil.copy(os.path.join(args.model_dir, name), args.out)
  n = sum(v.size for v in mapping.flatten(params).values())
  print(f"wrote {args.out}: {n:,} JanusFlow parameters" + (", VAE" if vae_params else ""))


@friendly_errors("jfl-export")
def export_main(argv=None):
  ap = argparse.ArgumentParser(prog="jfl-export", description="jfl checkpoint -> HF/diffusers layout")
  ap.add_argument("--ckpt", required=True, help="directory written by jfl-convert")
  ap.add_argument("--out", required=True, help="output HF-layout JanusFlow directory")
  ap.add_argument("--vae-out", help="also write the VAE as a diffusers directory here")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = ap.parse_args(argv)
  if not checkpoint.is_converted(args.ckpt):
    raise ValueError(f"{args.ckpt}: not a jfl checkpoint (no {checkpoint.CONFIG_FILE})")
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else None
  cfg, params, vae_params = checkpoint.load_converted(args.ckpt)
  hf.export_janusflow(params, cfg, args.out, dtype)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(args.ckpt, name)):
      shutil.copy(os.path.join(args.ckpt, name), args.out)
  if args.vae_out:
    if vae_params is None:
      raise ValueError(f"{args.ckpt}: holds no VAE")
    hf.export_vae(vae_params, cfg.vae, args.vae_out, dtype)
  print(f"wrote {args.out}" + (f" and {args.vae_out}" if args.vae_out else ""))
