"""Deterministic scoring for the shapes demo: generated images and one-word answers.

Every pixel is classified by its nearest colour (Euclidean RGB) among the background and the
6 palette colours; "foreground" = not nearest to the background. An image is scoreable when
its foreground covers between `MIN_FRAC` and `MAX_FRAC` of the pixels (one shape on a
background); otherwise every attribute reads "none" (blank or flooded images never score).

* colour: majority palette colour over the foreground pixels.
* position: the foreground centroid's offset from the image centre, matched to the position
  whose direction (`shapes.DIRECTIONS`) it points along most (the renderer puts the centre
  S/4 along that direction, jitter <= S/16).
* shape (extra): foreground fill ratio of its bounding box: square ~1, circle ~pi/4,
  triangle ~0.55-0.65.
"""

from typing import Any, Mapping, Sequence

import numpy as np

from jfl.demo import shapes

MIN_FRAC = 0.01   # fewer foreground pixels than this fraction: "none"
MAX_FRAC = 0.5    # more: not a single shape on a background, "none"

_NAMES = ("background",) + shapes.COLOURS
_REF = np.asarray([shapes.BACKGROUND] + [shapes.PALETTE[c] for c in shapes.COLOURS], np.float32)


def _check(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
  return image


def to_uint8(images: Any, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
  """Float images in `value_range` (any leading dims, last dim 3) -> uint8 in [0, 255]."""
  lo, hi = value_range
  x = (np.asarray(images, np.float32) - lo) / (hi - lo)
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def classify_pixels(image: np.ndarray) -> np.ndarray:
  """int [H, W]: 0 = background, k = shapes.COLOURS[k - 1] (nearest reference colour)."""
  x = _check(image).astype(np.float32)
  # |x - ref|^2 up to the per-pixel constant |x|^2.
  d = (_REF ** 2).sum(-1) - 2.0 * x @ _REF.T  # [H, W, 7]
  return np.argmin(d, axis=-1)


def _foreground(image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
  """(labels [H, W], mask [H, W]) or None when the foreground size is implausible."""
  labels = classify_pixels(image)
  mask = labels > 0
  frac = mask.mean()
  if frac < MIN_FRAC or frac > MAX_FRAC:
    return None
  return labels, mask


def describe(image: np.ndarray) -> dict[str, str]:
  """uint8 [H, W, 3] -> dict(colour, position, shape) of its one shape; "none" values if none."""
  fg = _foreground(image)
  if fg is None:
    return dict(colour="none", position="none", shape="none")
  labels, mask = fg
  counts = np.bincount(labels[mask], minlength=len(_NAMES))[1:]
  h, w = mask.shape
  ys, xs = np.nonzero(mask)
  off = np.array([xs.mean() + 0.5 - w / 2, ys.mean() + 0.5 - h / 2])
  dots = [float(off @ np.asarray(shapes.DIRECTIONS[p])) for p in shapes.POSITIONS]
  fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
  return dict(colour=shapes.COLOURS[int(np.argmax(counts))],
              position=shapes.POSITIONS[int(np.argmax(dots))],
              shape="square" if fill > 0.9 else "circle" if fill > 0.71 else "triangle")


def dominant_colour(image: np.ndarray) -> str:
  """uint8 [H, W, 3] -> majority palette colour of the foreground pixels, or "none"."""
  return describe(image)["colour"]


def shape_position(image: np.ndarray) -> str:
  """uint8 [H, W, 3] -> "left" | "right" | "top" | "bottom" from the foreground centroid, or "none"."""
  return describe(image)["position"]


def shape_kind(image: np.ndarray) -> str:
  """uint8 [H, W, 3] -> "circle" | "square" | "triangle" by bounding-box fill ratio, or "none".

  Reliable on rendered images at sizes that are multiples of 32; coarse on generated ones.
  """
  return describe(image)["shape"]


def _attrs(a: Any) -> tuple[str | None, str, str]:
  """(shape or None, colour, position) from an Example-like object, a mapping or a tuple."""
  if isinstance(a, Mapping):
    return a.get("shape"), a["colour"], a["position"]
  if hasattr(a, "colour"):
    return getattr(a, "shape", None), a.colour, a.position
  if len(a) == 3:
    return tuple(a)
  colour, position = a
  return None, colour, position


def score_generation(images: Sequence[np.ndarray] | np.ndarray,
                     prompts_attrs: Sequence[Any]) -> dict[str, float]:
  """Accuracy of generated images against the prompts' attributes.

  Args:
    images: N uint8 images [H, W, 3] (a list or an array [N, H, W, 3]).
    prompts_attrs: N items: `Example`s, mappings with "colour", "position" (and optional
      "shape"), or tuples (shape, colour, position) / (colour, position).
  Returns:
    dict(colour_acc, position_acc, both_acc (colour and position right), shape_acc (over the
    items that name a shape; nan if none), n).
  """
  if len(images) != len(prompts_attrs):
    raise ValueError(f"{len(images)} images but {len(prompts_attrs)} attribute sets")
  col = pos = both = shp = n_shape = 0
  for img, a in zip(images, prompts_attrs):
    shape, colour, position = _attrs(a)
    got = describe(img)
    c, p = got["colour"] == colour, got["position"] == position
    col, pos, both = col + c, pos + p, both + (c and p)
    if shape is not None:
      n_shape += 1
      shp += got["shape"] == shape
  n = max(len(images), 1)
  return dict(colour_acc=col / n, position_acc=pos / n, both_acc=both / n,
              shape_acc=shp / n_shape if n_shape else float("nan"), n=len(images))


def score_answers(answers: Sequence[str], expected: Sequence[str]) -> float:
  """Exact-match accuracy after strip() and lower(); 0.0 for empty input."""
  if len(answers) != len(expected):
    raise ValueError(f"{len(answers)} answers but {len(expected)} expected")
  if not answers:
    return 0.0
  hits = sum(a.strip().lower() == e.strip().lower() for a, e in zip(answers, expected))
  return hits / len(answers)
