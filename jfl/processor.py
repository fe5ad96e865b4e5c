"""Image preprocessing exactly as the reference `VLMImageProcessor` (reference doc §4.3), on the host.

Understanding: resize the long side to `size` (PIL bicubic, `int()` truncation, min side 14), pad
to a square with the mean colour (127, 127, 127), scale to [-1, 1].
Generation training: resize the short side to `size`, random square crop, scale to [-1, 1].
"""

import numpy as np
from PIL import Image, UnidentifiedImageError

BACKGROUND = (127, 127, 127)  # tuple(int(0.5 * 255) for each channel): the reference's mean colour
MIN_SIZE = 14


def load_image(path: str) -> Image.Image:
  """An RGB PIL image; ValueError naming the path if it is missing or unreadable."""
  try:
    with Image.open(path) as img:
      return img.convert("RGB")
  except FileNotFoundError:
    raise ValueError(f"image {path}: no such file") from None
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"image {path}: cannot read image ({e})") from None


def normalize(pixels: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1]: (x / 255 - 0.5) / 0.5."""
  return ((pixels.astype(np.float32) * np.float32(1 / 255)) - np.float32(0.5)) / np.float32(0.5)


def expand_to_square(img: Image.Image, background=BACKGROUND) -> Image.Image:
  w, h = img.size
  if w == h:
    return img
  side = max(w, h)
  out = Image.new(img.mode, (side, side), background)
  out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
  return out


def understanding_image(img: Image.Image, size: int = 384) -> np.ndarray:
  """PIL RGB image -> float32 [size, size, 3] in [-1, 1] (NHWC; the reference returns CHW)."""
  w, h = img.size
  longest = max(w, h)
  new_h, new_w = max(int(h / longest * size), MIN_SIZE), max(int(w / longest * size), MIN_SIZE)
  img = expand_to_square(img.convert("RGB").resize((new_w, new_h), Image.BICUBIC))
  return normalize(np.asarray(img))


def generation_image(img: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
  """PIL RGB image -> float32 [size, size, 3] in [-1, 1]: short side to `size`, random square crop."""
  w, h = img.size
  scale = size / min(w, h)
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  img = img.convert("RGB").resize((new_w, new_h), Image.BICUBIC)
  x, y = int(rng.integers(0, new_w - size + 1)), int(rng.integers(0, new_h - size + 1))
  return normalize(np.asarray(img.crop((x, y, x + size, y + size))))
