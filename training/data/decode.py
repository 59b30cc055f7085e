"""One image, from its bytes to the pixels the model trains on: decode, convert, resize, crop.

`image_to_array` is the one function every path calls (in memory, in DataLoader workers, while building the cache,
while streaming), so every path sees the same pixels: 8-bit images become uint8 (C, H, W) arrays, whose shorter side
is the training resolution; `to_model_range` maps them to [-1, 1] as `x / 255 * 2 - 1`. A broken file raises
`BrokenImageError` naming it, in whatever process decodes it.
"""

import io
import os

import numpy as np
import torch
from PIL import Image

# Integer modes of more than 8 bits, by the largest value of their range (PNG's 16-bit grayscale opens as "I;16", or
# as "I" in older Pillow): scaled by that value, never clipped to 8 bits.
HIGH_BIT_DEPTH_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


class BrokenImageError(ValueError):
    """An image file could not be decoded; the message names the file."""


def open_image(source, name: str, draft_resolution=None) -> Image.Image:
    """Open and fully decode an image: a path, bytes, a PIL image, or `datasets`' undecoded `{"bytes", "path"}`.

    With `draft_resolution`, a JPEG decodes at a reduced scale (libjpeg's DCT scaling) whose shorter side stays at
    least `draft_resolution`: a 1024-px photo trained at 256 px is decoded at 512 px, several times faster. A broken
    file raises `BrokenImageError` naming it.
    """
    try:
        if isinstance(source, (str, os.PathLike)):
            image = Image.open(source)
        elif isinstance(source, dict):  # datasets' undecoded Image feature
            image = Image.open(io.BytesIO(source["bytes"])) if source.get("bytes") else Image.open(source["path"])
        elif isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
        else:
            image = source
        if draft_resolution is not None and image.format == "JPEG" and image.mode in ("L", "RGB"):
            image.draft(image.mode, _resized_size(image.size, draft_resolution))
        image.load()
        return image
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise BrokenImageError(f"cannot read image {name}: {type(err).__name__}: {err}") from err


def _resized_size(size, resolution: int):
    """The (w, h) of an image of `size` resized so that its shorter side is `resolution` (aspect ratio kept)."""
    w, h = size
    scale = resolution / max(1, min(w, h))
    return (max(resolution, round(w * scale)), max(resolution, round(h * scale)))


def image_to_array(image: Image.Image, resolution: int, channels: int, center_crop: bool, name: str = "image"):
    """Convert, resize the shorter side to `resolution` and (center-)crop a PIL image.

    8-bit images go through PIL's "L"/"RGB" conversion and come back as uint8; 16-bit grayscale ("I;16", "I") is
    scaled by 65535 in floating point (PIL's own conversion to "L" would clip it) and comes back as float32 in
    [0, 1]. Without `center_crop` the longer side is kept (the crop is random and happens per epoch).

    Returns:
        `np.ndarray` of shape (C, H, W), uint8 (8-bit sources) or float32 in [0, 1] (high bit depth).
    """
    if image.mode in HIGH_BIT_DEPTH_MODES:
        top = HIGH_BIT_DEPTH_MODES[image.mode]
        low, high = image.getextrema()
        if low < 0 or high > top:
            raise BrokenImageError(
                f"image {name} has mode {image.mode!r} with values in [{low}, {high}], outside the 16-bit range "
                f"[0, {top}]; convert it to 8- or 16-bit first."
            )
        image, scale = image.convert("F"), float(top)
    elif image.mode == "F":
        raise BrokenImageError(
            f"image {name} has mode 'F' (32-bit floating point), whose value range is unknown; convert it to "
            "an 8- or 16-bit image first."
        )
    else:
        image, scale = image.convert("L" if channels == 1 else "RGB"), None
    new_w, new_h = _resized_size(image.size, resolution)
    image = image.resize((new_w, new_h), resample=Image.BILINEAR)
    if center_crop:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image) if scale is None else np.clip(np.asarray(image, dtype=np.float32) / scale, 0, 1)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[-1] != channels:  # a 16-bit grayscale image for a 3-channel model
        array = np.repeat(array, channels, axis=-1)
    return array.transpose(2, 0, 1).copy()  # contiguous, writable, and not a view of PIL's buffer


def decode_array(source, name: str, resolution: int, channels: int, center_crop: bool) -> np.ndarray:
    """`open_image` then `image_to_array`: the pixels of one source item (JPEGs decoded at a reduced scale)."""
    return image_to_array(open_image(source, name, resolution), resolution, channels, center_crop, name)


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """Pixels to the model's [-1, 1]: uint8 as `x / 255 * 2 - 1`, float32 in [0, 1] as `x * 2 - 1`."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0).mul_(2).sub_(1)  # x / 255 * 2 - 1, in place on the new float tensor
    return x.float().clamp(0, 1).mul_(2).sub_(1)


def pil_to_tensor(image: Image.Image, resolution: int, channels: int, center_crop: bool, name: str = "image"):
    """`image_to_array` as a (C, H, W) float tensor in [-1, 1]."""
    return to_model_range(torch.from_numpy(image_to_array(image, resolution, channels, center_crop, name)))


# ----------------------------------------------------------------------------------------------------------------
# Many images, in parallel (the in-memory path and the cache build)
# ----------------------------------------------------------------------------------------------------------------
_JOB = None  # (source, resolution, channels, center_crop, skip_broken) of the pool's worker process
CHUNK = 64  # images per task of the pool


def _set_job(job) -> None:
    global _JOB
    _JOB = job


def _decode_chunk(indices):
    source, resolution, channels, center_crop, skip_broken = _JOB
    out = []
    for i in indices:
        raw, name = source.item(i)
        try:
            out.append((i, decode_array(raw, name, resolution, channels, center_crop), name))
        except BrokenImageError:
            if not skip_broken:
                raise
            out.append((i, None, name))
    return out


def decode_many(source, resolution, channels, center_crop, skip_broken, num_workers, desc, disable=False):
    """Decode every item of `source` in order, in `num_workers` processes, with a progress bar (images/s).

    Yields:
        `(index, array or None for a skipped broken file, name)`, in index order.
    """
    from tqdm.auto import tqdm

    job = (source, resolution, channels, center_crop, skip_broken)
    chunks = [list(range(s, min(s + CHUNK, len(source)))) for s in range(0, len(source), CHUNK)]
    bar = tqdm(total=len(source), desc=desc, unit="img", disable=disable, smoothing=0.1)
    try:
        if num_workers <= 1 or len(chunks) <= 1:
            _set_job(job)
            results = map(_decode_chunk, chunks)
            pool = None
        else:
            import multiprocessing

            pool = multiprocessing.get_context("fork").Pool(num_workers, initializer=_set_job, initargs=(job,))
            results = pool.imap(_decode_chunk, chunks)
        for chunk in results:
            yield from chunk
            bar.update(len(chunk))
    finally:
        bar.close()
        _set_job(None)
        if pool is not None:
            pool.terminate()
            pool.join()
