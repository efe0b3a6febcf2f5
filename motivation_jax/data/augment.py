"""Host-side image augmentation in numpy (and PIL for resizing).

The random parameters are drawn by the caller for the *global* batch and then
sliced to this host's share, so a batch does not depend on how many processes
read it. Small images (CIFAR) are augmented a whole batch at a time; ImageNet's
crops depend on each image's size and are done one image at a time.
"""

from __future__ import annotations

import math

import numpy as np


def draw_crop_flip(rng: np.random.Generator, n: int, pad: int) -> dict[str, np.ndarray]:
  """Parameters of ``crop_flip`` for ``n`` images: offsets in [0, 2*pad], flips."""
  return {"offsets": rng.integers(0, 2 * pad + 1, size=(n, 2)),
          "flips": rng.random(n) < 0.5}


def crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int
              ) -> np.ndarray:
  """CIFAR's augmentation: zero-pad by ``pad``, crop back to size at ``offsets``,
  flip left-right where ``flips``. ``images`` is (N, H, W, C); one gather."""
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = offsets[:, 0, None] + np.arange(h)                       # (N, H)
  cols = offsets[:, 1, None] + np.arange(w)                       # (N, W)
  cols = np.where(flips[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def draw_inception_box(rng: np.random.Generator, height: int, width: int, *,
                       area_range: tuple[float, float] = (0.08, 1.0),
                       ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
                       attempts: int = 10) -> tuple[int, int, int, int]:
  """Inception-style random crop ``(top, left, h, w)``: a random fraction of the
  area with a log-uniform aspect ratio; after ``attempts`` misses, the central
  crop of the largest allowed aspect ratio (as torchvision's RandomResizedCrop)."""
  area = height * width
  log_ratio = (math.log(ratio_range[0]), math.log(ratio_range[1]))
  for _ in range(attempts):
    target = area * rng.uniform(*area_range)
    ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  ratio = width / height
  if ratio < ratio_range[0]:
    w, h = width, int(round(width / ratio_range[0]))
  elif ratio > ratio_range[1]:
    h, w = height, int(round(height * ratio_range[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of one HWC uint8 image (PIL, antialiased when shrinking)."""
  from PIL import Image  # only the ImageNet path resizes

  if image.shape[:2] == (height, width):
    return image
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((width, height), Image.BILINEAR))
  return out[..., None] if channels == 1 else out


def inception_crop_flip(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
  """ImageNet training augmentation: inception crop, resize to size x size, flip."""
  top, left, h, w = draw_inception_box(rng, *image.shape[:2])
  out = resize(image[top:top + h, left:left + w], size, size)
  return out[:, ::-1] if rng.random() < 0.5 else out


def centre_crop(image: np.ndarray, size: int, *, crop_fraction: float = 0.875) -> np.ndarray:
  """ImageNet evaluation: the central ``crop_fraction`` of the shorter side, resized
  to size x size (the same as resizing to size/0.875 and cropping the centre)."""
  height, width = image.shape[:2]
  side = max(1, int(round(min(height, width) * crop_fraction)))
  top, left = (height - side) // 2, (width - side) // 2
  return resize(image[top:top + side, left:left + side], size, size)
