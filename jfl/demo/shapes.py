"""A deterministic procedural data set: one coloured shape on a white background.

Every image holds ONE filled shape (circle, square, triangle) in one of 6 colours at one of 4
positions (left, right, top, bottom) on a plain white background. Rendering is pure numpy
(pixel-centre sampling, no anti-aliasing), so each pixel is exactly the background or exactly
the shape's palette colour.

Geometry at image size S (u = S / 32 pixels), in continuous coordinates where the image spans
[0, S] and pixel (y, x) has its centre at (y + .5, x + .5):
  centre = (S/2, S/2) + S/4 * direction(position) + u * (jx, jy),   jx, jy in {-2..2}
  radius r = u * k,  k in {4, 5, 6}
  circle: |p - c| <= r;  square: half side 0.85 r;  triangle: equilateral, apex up,
  circumradius 1.25 r, centroid at the centre.
So the centre always lies in its half along the position's axis (offset S/4 = 8u, jitter
<= 2u), which is what `jfl.demo.evaluate.shape_position` relies on.

Splits (fixed, independent of the seed): the 72 (shape, colour, position) triples are split
by attributes. A triple (s, c, p) with index sum (s + c + p) % 6 == 0 is HELD OUT ("test"):
12 triples, one colour per (shape, position) pair. The other 60 are "train". Every word and
every pair of attribute values (shape-colour, colour-position, shape-position) still occurs in
train, so held-out prompts are new combinations of seen words. Because the attribute triples
are disjoint, no (attributes, jitter) example, and no image, occurs in both splits.

Item i of `ShapesDataset(split, seed, n)` depends only on (split, seed, i): items are drawn in
blocks of len(combos(split)); each block is a seeded permutation of the split's triples, so
attribute values are balanced, and the jitter comes from a generator seeded by (seed, split, i).
"""

import dataclasses
import itertools
import operator
from typing import Mapping, NamedTuple, Sequence

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Well separated in RGB: the closest pair (blue, purple) is ~141 apart; all are >= 255 from white.
PALETTE: Mapping[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 20),
    "blue": (20, 40, 220),
    "yellow": (230, 220, 0),
    "purple": (150, 20, 170),
    "cyan": (0, 200, 220),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
# Unit direction (x, y) of each position from the image centre; y grows downwards.
DIRECTIONS: Mapping[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
SPLITS: tuple[str, ...] = ("train", "test")

QUESTIONS: Mapping[str, str] = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "position": "Where is the shape?",
}

_JITTER = 2            # centre jitter, in units of S/32, each axis
_RADII = (4, 5, 6)     # radius choices, in units of S/32
_SQUARE_HALF = 0.85    # square half side / r
_TRIANGLE_R = 1.25     # triangle circumradius / r


class Layout(NamedTuple):
  """Where a shape is drawn, in pixels: centre (cx, cy) and radius r."""
  cx: float
  cy: float
  r: float


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
  """One data item.

  image: uint8 [H, W, 3]. conversations: ((question, one-word answer), ...) about the image.
  text: one sentence of the text-only corpus about the example's attributes.
  """
  image: np.ndarray
  shape: str
  colour: str
  position: str
  caption: str
  conversations: tuple[tuple[str, str], ...]
  text: str
  layout: Layout


# ----------------------------------------------------------------------------- text


def caption(shape: str, colour: str, position: str) -> str:
  """E.g. "a red circle on the left", "a blue square at the top"."""
  where = "on the" if position in ("left", "right") else "at the"
  return f"a {colour} {shape} {where} {position}"


def conversations(shape: str, colour: str, position: str) -> tuple[tuple[str, str], ...]:
  """The understanding Q/A pairs; answers are single lowercase words."""
  return ((QUESTIONS["colour"], colour), (QUESTIONS["shape"], shape),
          (QUESTIONS["position"], position))


_SHAPE_FACTS = {"circle": "a circle is round.", "square": "a square has four sides.",
                "triangle": "a triangle has three sides."}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def sentences(shape: str, colour: str, position: str) -> tuple[str, ...]:
  """The text-only sentences about one (shape, colour, position)."""
  return (f"{colour} is a colour.", f"a {shape} is a shape.", _SHAPE_FACTS[shape],
          f"{position} is not {_OPPOSITE[position]}.", f"a {colour} {shape} is {colour}.")


def text_corpus() -> tuple[str, ...]:
  """Every text-only sentence, deduplicated, in a fixed order."""
  out = {}
  for s, c, p in itertools.product(SHAPES, COLOURS, POSITIONS):
    out.update(dict.fromkeys(sentences(s, c, p)))
  return tuple(out)


def all_texts() -> tuple[str, ...]:
  """Every caption, question, answer and corpus sentence the data set can produce."""
  out = {}
  for s, c, p in itertools.product(SHAPES, COLOURS, POSITIONS):
    out[caption(s, c, p)] = None
    for q, a in conversations(s, c, p):
      out[q] = out[a] = None
  out.update(dict.fromkeys(text_corpus()))
  return tuple(out)


# ----------------------------------------------------------------------------- splits


def is_heldout(shape: str, colour: str, position: str) -> bool:
  """True for the 12 attribute triples reserved for the "test" split."""
  return (SHAPES.index(shape) + COLOURS.index(colour) + POSITIONS.index(position)) % 6 == 0


def combos(split: str) -> tuple[tuple[str, str, str], ...]:
  """The (shape, colour, position) triples of a split, in a fixed order."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  want = split == "test"
  return tuple(t for t in itertools.product(SHAPES, COLOURS, POSITIONS) if is_heldout(*t) == want)


# ----------------------------------------------------------------------------- images


def sample_layout(position: str, size: int, rng: np.random.Generator | None) -> Layout:
  """Centre and radius for a shape at `position`; `rng=None` gives the un-jittered layout."""
  u = size / 32
  dx, dy = DIRECTIONS[position]
  if rng is None:
    k, jx, jy = _RADII[len(_RADII) // 2], 0, 0
  else:
    k = _RADII[int(rng.integers(len(_RADII)))]
    jx, jy = (int(v) for v in rng.integers(-_JITTER, _JITTER + 1, size=2))
  return Layout(size / 2 + dx * size / 4 + jx * u, size / 2 + dy * size / 4 + jy * u, k * u)


def shape_mask(shape: str, layout: Layout, size: int) -> np.ndarray:
  """bool [size, size]: pixels whose centre lies inside the shape."""
  cx, cy, r = layout
  ys, xs = np.mgrid[0:size, 0:size] + 0.5
  x, y = xs - cx, ys - cy
  if shape == "circle":
    return x * x + y * y <= r * r
  if shape == "square":
    h = _SQUARE_HALF * r
    return (np.abs(x) <= h) & (np.abs(y) <= h)
  if shape == "triangle":
    # Equilateral, apex up: vertices at angles -90, 30, 150 deg (y down) on the circumcircle.
    R = _TRIANGLE_R * r
    inside = y <= R / 2  # bottom edge
    # The two slanted edges pass through the apex (0, -R) with slopes +-sqrt(3).
    s = np.sqrt(3.0)
    inside &= y + R >= s * x
    inside &= y + R >= -s * x
    return inside
  raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw(shape: str, colour: str, layout: Layout, size: int = 32) -> np.ndarray:
  """uint8 [size, size, 3]: the shape in its palette colour on the background."""
  if colour not in PALETTE:
    raise ValueError(f"unknown colour {colour!r}; expected one of {COLOURS}")
  img = np.empty((size, size, 3), np.uint8)
  img[...] = BACKGROUND
  img[shape_mask(shape, layout, size)] = PALETTE[colour]
  return img


def render(shape: str, colour: str, position: str, size: int = 32,
           rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 [size, size, 3]: one shape; size/position jitter drawn from `rng` (None: none)."""
  if position not in DIRECTIONS:
    raise ValueError(f"unknown position {position!r}; expected one of {POSITIONS}")
  return draw(shape, colour, sample_layout(position, size, rng), size)


# ----------------------------------------------------------------------------- data set


class ShapesDataset:
  """Random-access data set of `Example`s (a Grain `RandomAccessDataSource`).

  Args:
    split: "train" or "test" (held-out attribute triples, see the module docstring).
    seed: non-negative int; item i depends only on (split, seed, i).
    num_examples: length.
    image_size: H = W of the images (default 32).
  """

  def __init__(self, split: str = "train", seed: int = 0, num_examples: int = 4096,
               image_size: int = 32):
    self.split = split
    self.seed = int(seed)
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self._combos = combos(split)
    if self.seed < 0 or self.num_examples < 0 or self.image_size < 8:
      raise ValueError("seed and num_examples must be >= 0 and image_size >= 8")

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (f"ShapesDataset(split={self.split!r}, seed={self.seed}, "
            f"num_examples={self.num_examples}, image_size={self.image_size})")

  def attributes(self, index: int) -> tuple[str, str, str]:
    """(shape, colour, position) of item `index` without rendering it."""
    i = self._check(index)
    block, k = divmod(i, len(self._combos))
    perm = np.random.default_rng((self.seed, SPLITS.index(self.split), 0, block)).permutation(
        len(self._combos))
    return self._combos[int(perm[k])]

  def __getitem__(self, index: int) -> Example:
    i = self._check(index)
    shape, colour, position = self.attributes(i)
    rng = np.random.default_rng((self.seed, SPLITS.index(self.split), 1, i))
    layout = sample_layout(position, self.image_size, rng)
    texts = sentences(shape, colour, position)
    return Example(
        image=draw(shape, colour, layout, self.image_size),
        shape=shape, colour=colour, position=position,
        caption=caption(shape, colour, position),
        conversations=conversations(shape, colour, position),
        text=texts[int(rng.integers(len(texts)))],
        layout=layout)

  def _check(self, index) -> int:
    i = operator.index(index)
    if i < 0:
      i += self.num_examples
    if not 0 <= i < self.num_examples:
      raise IndexError(f"index {index} out of range for {self!r}")
    return i


def all_layouts(position: str, size: int = 32) -> Sequence[Layout]:
  """Every layout `sample_layout` can return for `position` (for exhaustive tests)."""
  u = size / 32
  dx, dy = DIRECTIONS[position]
  js = range(-_JITTER, _JITTER + 1)
  return [Layout(size / 2 + dx * size / 4 + jx * u, size / 2 + dy * size / 4 + jy * u, k * u)
          for k in _RADII for jx in js for jy in js]
