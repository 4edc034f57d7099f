"""The fast training image path: decode (at reduced scale where the crop allows) and random-resized-crop on the
CPU workers, ship uint8 pixels, normalise on the device.

OpenCLIP's pipeline decodes every JPEG at full size, crops, resizes, then converts to float and normalises on the
CPU (``ToTensor`` + ``Normalize``), and the workers ship float32 batches (4x the bytes of uint8). Here:

- the crop box is drawn first, from the image header alone, so a JPEG much larger than the crop needs is decoded
  at 1/2, 1/4 or 1/8 scale by libjpeg's scaled IDCT (``Image.draft``), never below the output size;
- the crop is resized by torch's antialiased uint8 kernels (vectorised; within 2 grey levels of PIL's bicubic
  filter but for a few values per million, which differ by 3, at about half its cost here);
- the worker returns an (H, W, 3) uint8 tensor and batches stay uint8 until :func:`normalize_on_device`, which
  converts, scales and normalises in one pass where the model runs (on a GPU, after a pinned, 4x smaller copy).

The crop is drawn from ``rng`` (a ``random.Random`` seeded per sample by the caller), with torchvision's
RandomResizedCrop procedure: ten tries at an area fraction from ``scale`` and a log-uniform aspect ratio from
``ratio``, then a centred crop of the clamped ratio.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

_RESAMPLE = ("bicubic", "bilinear")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CropSpec:
    size: int
    scale: tuple[float, float] = (0.9, 1.0)
    """Area fraction of the crop (open_clip's training default)."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    draft: bool = True
    """Let libjpeg decode large JPEGs at a reduced scale (never below the output size)."""

    @classmethod
    def from_preprocess_cfg(cls, cfg: dict, scale: tuple[float, float], draft: bool = True) -> "CropSpec":
        size = cfg.get("size", 224)
        if isinstance(size, (list, tuple)):
            if len(set(size[-2:])) != 1:
                raise ValueError(f"the fast image path needs a square image size, the model has {size}: "
                                 f"use train.image_pipeline=open_clip")
            size = size[-1]
        interpolation = cfg.get("interpolation") or "bicubic"
        return cls(int(size), tuple(scale), interpolation=interpolation if interpolation in _RESAMPLE else "bicubic",
                   draft=draft)


def crop_box(width: int, height: int, spec: CropSpec, rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of a random resized crop, in source pixels."""
    area = width * height
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*spec.scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    aspect = width / height
    if aspect < spec.ratio[0]:
        w, h = width, round(width / spec.ratio[0])
    elif aspect > spec.ratio[1]:
        w, h = round(height * spec.ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_random_crop(data: bytes, spec: CropSpec, rng: random.Random) -> torch.Tensor:
    """An encoded image -> (size, size, 3) uint8 tensor of a random resized crop."""
    return decode_random_crops(data, [spec], rng)[0]


def decode_random_crops(data: bytes, specs: list[CropSpec], rng: random.Random) -> list[torch.Tensor]:
    """One decode, then one random resized crop per spec (boxes drawn in order from ``rng``): (size, size, 3)
    uint8 tensors. A JPEG is decoded at the smallest scale that still serves every crop."""
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        boxes = [crop_box(width, height, spec, rng) for spec in specs]
        if all(spec.draft for spec in specs) and im.format == "JPEG":
            # The smallest DCT scale that keeps every crop at least `size` pixels on both sides.
            want = (max(math.ceil(width * spec.size / w) for spec, (_, _, w, _) in zip(specs, boxes)),
                    max(math.ceil(height * spec.size / h) for spec, (_, _, _, h) in zip(specs, boxes)))
            if want[0] < width and want[1] < height:
                im.draft("RGB", want)
        if im.mode != "RGB":  # palette, alpha, greyscale, CMYK: resample in RGB
            im = im.convert("RGB")
        pixels = torch.from_numpy(np.array(im))
    return [_resize_box(pixels, box, width, height, spec) for box, spec in zip(boxes, specs)]


def _resize_box(pixels: torch.Tensor, box: tuple[int, int, int, int], width: int, height: int,
                spec: CropSpec) -> torch.Tensor:
    """The crop ``box`` (in the original image's pixels) of the possibly reduced-scale ``pixels``, resized."""
    left, top, w, h = box
    fx, fy = pixels.shape[1] / width, pixels.shape[0] / height
    x0, y0 = round(left * fx), round(top * fy)
    x1, y1 = max(x0 + 1, round((left + w) * fx)), max(y0 + 1, round((top + h) * fy))
    crop = pixels[y0:y1, x0:x1].permute(2, 0, 1).unsqueeze(0)  # a channels-last NCHW view: no copy
    out = torch.nn.functional.interpolate(crop, size=(spec.size, spec.size), mode=spec.interpolation,
                                          antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).contiguous()


def pil_decoder(transform: Callable[[Image.Image], torch.Tensor]) -> Callable[[bytes, random.Random], torch.Tensor]:
    """A decode function around a PIL transform (e.g. open_clip's ``preprocess_train``): the transform draws its
    randomness from torch's default generator, seeded from ``rng`` for the call and restored afterwards.
    (torch.manual_seed would also queue CUDA seeding, ~1 ms a call; the CPU generator alone is enough.)"""

    def decode(data: bytes, rng: random.Random) -> torch.Tensor:
        generator = torch.random.default_generator
        saved = generator.get_state()
        generator.manual_seed(rng.getrandbits(62))
        try:
            with Image.open(io.BytesIO(data)) as im:
                return transform(im.convert("RGB"))
        finally:
            generator.set_state(saved)

    return decode


class RandomCropDecoder:
    """``decode(data, rng)`` for :class:`training.data.ShardStream` (a class, so DataLoader workers can pickle it)."""

    def __init__(self, spec: CropSpec):
        self.spec = spec

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        return decode_random_crop(data, self.spec, rng)


class Normalizer:
    """uint8 (B, H, W, 3) batches -> normalised float (B, 3, H, W) on the device, in one pass: x * a + b with
    a = 1 / (255 std) and b = -mean / std, the same as ToTensor + Normalize. The result is channels-last in memory
    (a free permute of the HWC pixels), which convolution kernels prefer. Batches of several views per sample,
    (B, V, H, W, 3) from :class:`SimCLRViewsDecoder`, become (B, V, 3, H, W)."""

    def __init__(self, mean, std, device: torch.device):
        mean_t = torch.tensor(mean or OPENAI_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std_t = torch.tensor(std or OPENAI_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale, self.shift, self.device = 1.0 / (255.0 * std_t), -mean_t / std_t, device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:  # already model-ready (normalised in a worker, or the open_clip pipeline)
            return images.to(self.device, non_blocking=True)
        # Element-wise in the (B, H, W, 3) layout, where every operand is contiguous (2x faster on a CPU than on a
        # permuted view), then a free permute to NCHW.
        x = images.to(self.device, non_blocking=True).float()
        x.mul_(self.scale.view(3)).add_(self.shift.view(3))
        return x.movedim(-1, -3)


# --- SimCLR views (SLIP) ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SimCLRAugment:
    """SimCLR's distortions of a view, with the strengths SLIP uses: horizontal flip, colour jitter
    (brightness, contrast, saturation 0.4, hue 0.1) with probability 0.8, grey-scale 0.2, Gaussian blur 0.5 with
    sigma in [0.1, 2]. The crop (scale 0.08 to 1) is the decoder's."""

    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)


def simclr_distort(pixels: torch.Tensor, augment: SimCLRAugment, rng: random.Random) -> torch.Tensor:
    """(H, W, 3) uint8 -> the same, distorted; every random choice comes from ``rng``.

    PIL's C kernels, as SLIP's torchvision PIL transforms use: on 224 px views they took half the time of
    torchvision's tensor kernels here (the tensor hue shift alone 5 ms), and PIL's blur is the one MoCo v2 and
    SLIP use."""
    image = Image.fromarray(pixels.numpy())
    if rng.random() < augment.flip_p:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < augment.jitter_p:
        image = _colour_jitter(image, augment.jitter, rng)
    if rng.random() < augment.grayscale_p:
        image = image.convert("L").convert("RGB")
    if rng.random() < augment.blur_p:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*augment.blur_sigma)))
    return torch.from_numpy(np.array(image))


def _colour_jitter(image: Image.Image, strengths: tuple[float, float, float, float],
                   rng: random.Random) -> Image.Image:
    """torchvision's ColorJitter: the four adjustments in a random order, each factor drawn uniformly."""
    b, c, s, h = strengths
    factors = [rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c), rng.uniform(1 - s, 1 + s), rng.uniform(-h, h)]
    adjust = [lambda im, f: ImageEnhance.Brightness(im).enhance(f), lambda im, f: ImageEnhance.Contrast(im).enhance(f),
              lambda im, f: ImageEnhance.Color(im).enhance(f), _shift_hue]
    order = list(range(4))
    rng.shuffle(order)
    for i in order:
        image = adjust[i](image, factors[i])
    return image


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the HSV hue by ``shift`` of a turn (as torchvision's PIL adjust_hue, wrapping in uint8)."""
    step = int(shift * 255) % 256
    h, s, v = image.convert("HSV").split()
    h = h.point([(x + step) % 256 for x in range(256)])
    return Image.merge("HSV", (h, s, v)).convert("RGB")


class SimCLRViewsDecoder:
    """``decode(data, rng)`` for SLIP: one decode gives CLIP's random resized crop and SimCLR's two distorted views
    of the same image, stacked as a (3, size, size, 3) uint8 tensor (CLIP crop first). All randomness comes from
    the per-sample ``rng``, so a resumed run draws the same views."""

    def __init__(self, spec: CropSpec, view_scale: tuple[float, float] = (0.08, 1.0),
                 augment: SimCLRAugment = SimCLRAugment()):
        self.spec, self.view_spec, self.augment = spec, replace(spec, scale=tuple(view_scale)), augment

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        clip, *views = decode_random_crops(data, [self.spec, self.view_spec, self.view_spec], rng)
        return torch.stack([clip, *(simclr_distort(v, self.augment, rng) for v in views)])
