"""Per-sample decode + augmentation of encoded images at a chosen resolution (the photo path).

Training: RandomResizedCrop (scale 0.08-1, aspect ratio 3/4-4/3, torchvision's sampling:
ten tries, then a centred crop of the clamped ratio) and a horizontal flip; evaluation:
resize the shorter side to ``round(res / 0.875)`` and take the centred ``res x res``
crop (the ImageNet protocol of Inception, arXiv 1512.00567, and ResNet, arXiv 1512.03385). The
crop box is drawn from a generator seeded by (seed, epoch, position), so a resumed run
crops and flips every sample exactly as the uninterrupted one.

Decoding is region-aware: the crop box is drawn from the image's header size first,
then a JPEG is decoded at the smallest DCT scale (libjpeg-turbo's M/8) that still gives
the box at least ``res`` pixels a side, the box is cut out, and one antialiased bilinear
resize (torch's uint8 kernel) brings it to ``res``. ``decoder="simplejpeg"`` (default when
installed) decodes with simplejpeg; ``"pil"`` uses Pillow with ``Image.draft`` (1/2, 1/4,
1/8 only) and is the fallback for PNG, CMYK JPEGs and anything simplejpeg rejects.
``benchmarks/images.py`` measures both against the plain Pillow way.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CROP_FRACTION = 0.875
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
DECODERS = ("auto", "simplejpeg", "pil")
_JPEG_EXTS = ("jpg", "jpeg")

Box = tuple[float, float, float, float]  # x, y, width, height in the original image's pixels


def have_simplejpeg() -> bool:
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_decoder(decoder: str) -> str:
    """``auto`` -> ``simplejpeg`` when importable, else ``pil``; a named one is checked."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "auto":
        return "simplejpeg" if have_simplejpeg() else "pil"
    if decoder == "simplejpeg" and not have_simplejpeg():
        raise ValueError("decoder 'simplejpeg' is not installed (pip install simplejpeg)")
    return decoder


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator of one sample's augmentation: a pure function of (seed, epoch, position)."""
    return np.random.default_rng([seed, epoch, position, 0x1AA6E])


def rrc_box(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float] = SCALE,
            ratio: tuple[float, float] = RATIO) -> Box:
    """RandomResizedCrop's box (torchvision ``get_params``): area share in ``scale``, log-uniform ratio."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return x, y, w, h
    in_ratio = width / height  # fallback: the centred crop of the closest allowed ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_box(width: int, height: int, resolution: int, crop_fraction: float = CROP_FRACTION) -> Box:
    """The box of Resize(round(res / crop_fraction)) (shorter side) + CenterCrop(res), in original pixels."""
    resize = int(round(resolution / crop_fraction))
    rw, rh = (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)
    left, top = int(round((rw - resolution) / 2.0)), int(round((rh - resolution) / 2.0))
    side_x, side_y = resolution * (width / rw), resolution * (height / rh)
    return left * width / rw, top * height / rh, side_x, side_y  # scale kept per axis (rw, rh are rounded)


def _open_pil(data: bytes, ext: str):
    """A PIL image of the bytes (``npy``: a uint8 array saved with numpy)."""
    from PIL import Image

    if ext == "npy":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype != np.uint8:
            raise ValueError(f"npy image dtype {arr.dtype}, expected uint8")
        return Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    return Image.open(io.BytesIO(data))


def header_size(data: bytes, ext: str) -> tuple[int, int]:
    """(width, height) from the image's header (no pixel decode)."""
    if ext in _JPEG_EXTS and have_simplejpeg():
        import simplejpeg

        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return int(w), int(h)
        except Exception:  # noqa: BLE001 - not a JPEG simplejpeg reads: let Pillow say
            pass
    with _open_pil(data, ext) as im:
        return im.size


def _decode_scaled(data: bytes, ext: str, need: tuple[int, int], channels: int, decoder: str) -> np.ndarray:
    """uint8 (h, w, C) decoded at the smallest scale that is at least ``need`` = (width, height)."""
    if decoder == "simplejpeg" and ext in _JPEG_EXTS:
        import simplejpeg

        try:
            a = simplejpeg.decode_jpeg(data, "RGB" if channels == 3 else "GRAY", min_height=need[1],
                                       min_width=need[0])
            return a if a.ndim == 3 else a[:, :, None]
        except Exception:  # noqa: BLE001 - CMYK, a quirk libjpeg-turbo's strict mode refuses: Pillow decodes it
            pass
    mode = "RGB" if channels == 3 else "L"
    with _open_pil(data, ext) as im:
        if im.format in ("JPEG", "MPO"):
            im.draft(mode, need)  # 1/2, 1/4, 1/8 in the DCT domain, never below ``need``
        a = np.asarray(im if im.mode == mode else im.convert(mode))
    return a if a.ndim == 3 else a[:, :, None]


def decode_region(data: bytes, ext: str, box: Box, full: tuple[int, int], resolution: int, channels: int,
                  decoder: str = "simplejpeg") -> np.ndarray:
    """The ``box`` of an encoded image (``full`` = its (width, height)) resized to ``resolution``: uint8 (res, res, C)."""
    width, height = full
    x, y, w, h = box
    k = min(1.0, max(resolution / w, resolution / h))
    need = (max(1, math.ceil(width * k)), max(1, math.ceil(height * k)))
    a = _decode_scaled(data, ext, need, channels, decoder)
    kx, ky = a.shape[1] / width, a.shape[0] / height
    x0, y0 = min(int(round(x * kx)), a.shape[1] - 1), min(int(round(y * ky)), a.shape[0] - 1)
    x1, y1 = max(x0 + 1, min(int(round((x + w) * kx)), a.shape[1])), max(y0 + 1, min(int(round((y + h) * ky)), a.shape[0]))
    if (y1 - y0, x1 - x0) == (resolution, resolution):
        return np.ascontiguousarray(a[y0:y1, x0:x1])
    box_px = a[y0:y1, x0:x1]
    if not (box_px.flags.c_contiguous and box_px.flags.writeable):
        box_px = np.array(box_px)  # a row-wise copy (torch.tensor of a strided view is several times slower)
    # HWC-dense = channels_last (1, C, h, w): torch's vectorised uint8 antialias path
    region = torch.from_numpy(box_px).permute(2, 0, 1)[None]
    out = F.interpolate(region, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()  # channels_last: already (res, res, C) in memory


def transform_sample(data: bytes, ext: str, *, resolution: int, channels: int, train: bool,
                     rng: np.random.Generator | None, hflip: bool = True, decoder: str = "simplejpeg") -> np.ndarray:
    """Decode + augment one encoded image: uint8 (res, res, C).

    ``train``: RandomResizedCrop + (when ``hflip``) a horizontal flip with probability 1/2, both
    drawn from ``rng``; else resize + centre crop (``rng`` unused).
    """
    full = header_size(data, ext)
    if train:
        box = rrc_box(rng, *full)
        flip = hflip and bool(rng.random() < 0.5)
    else:
        box, flip = center_box(*full, resolution), False
    out = decode_region(data, ext, box, full, resolution, channels, decoder)
    return out[:, ::-1] if flip else out
