"""Helpers for parity tests against the PyTorch references (torch, transformers, timm, diffusers)."""

import numpy as np
import torch

# timm imports torchvision. The torchvision 0.28.0 wheel built for torch 2.13.0 ships CUDA-linked
# ops that cannot load on the CPU torch wheel, and its import registers fake kernels for two of
# them unconditionally. Declaring their schemas lets the (pure Python) parts timm uses import.
try:
  torch.ops.torchvision.nms.default
except (AttributeError, RuntimeError):
  _lib = torch.library.Library("torchvision", "DEF")
  _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

torch.set_default_dtype(torch.float32)


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
  """Overwrites every parameter with random values so no default initialisation hides a bug.

  Norm weights become 1 + noise; everything else N(0, scale^2)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * scale
      is_norm_weight = name.endswith("weight") and p.ndim == 1
      p.copy_(1.0 + noise if is_norm_weight else noise)
  return module.eval()


def state_dict_numpy(module: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
  return {prefix + k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def rel_err(a, b) -> float:
  """max |a - b| / max |b|: the parity metric (target <= 1e-5 in float32)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
