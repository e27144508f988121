"""A visitor's photograph of an exhibit, simulated: frame and wall, perspective, uneven light,
glare, colour cast, blur and sensor noise; and the image helpers every synthetic dataset shares
(the demo museum, the test suite's Met fixture): bundled sample photos, resizing, JPEG files.

Images are uint8 (H, W, 3) arrays, or float images in [0, 1] inside the simulation.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image

QUERY_LONG_SIDE = 512      # visitor photos, kept small so extraction stays fast on 2 cores


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any sample image (bool, float, grey, RGBA) as (H, W, 3) uint8 RGB."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        image = image.astype(np.float64)
        lo, hi = float(image.min()), float(image.max())
        image = ((image - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.shape[2] == 4:  # RGBA over white
        alpha = image[:, :, 3:4].astype(np.float64) / 255.0
        image = (image[:, :, :3] * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(image[:, :, :3])


def skimage_photo(name: str) -> np.ndarray:
    """A sample photograph scikit-image ships (``skimage.data.<name>``) as (H, W, 3) uint8 RGB."""
    import skimage.data
    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
        image = image[0]
    return as_rgb_uint8(image)


def rng_stream(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, stream)]))


def _resize(pixels: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize a uint8 (H, W, 3) array to (width, height) with PIL's Lanczos filter."""
    return np.asarray(Image.fromarray(pixels).resize(size, Image.LANCZOS))


def shrink_to(pixels: np.ndarray, max_side: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return pixels
    return _resize(pixels, (max(1, round(width * scale)), max(1, round(height * scale))))


def _scale_to(pixels: np.ndarray, long_side: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    scale = long_side / max(height, width)
    return _resize(pixels, (max(1, round(width * scale)), max(1, round(height * scale))))


def _to_float(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / 255.0


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a small random grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((shape[1], shape[0]), Image.BICUBIC)
    return np.asarray(img)


def save_jpeg(pixels: np.ndarray, path: Path, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality), optimize=False)
    path.write_bytes(buffer.getvalue())


# --------------------------------------------------------------------------------------------
# The visitor's photograph
# --------------------------------------------------------------------------------------------

FRAME_COLOURS = {  # RGB in [0, 1]
    "gilt": (0.74, 0.58, 0.27), "walnut": (0.36, 0.22, 0.12), "black": (0.07, 0.07, 0.07),
    "white": (0.90, 0.89, 0.86), "silver": (0.66, 0.67, 0.69), "oak": (0.62, 0.45, 0.27),
}
WALL_COLOURS = {
    "cream": (0.88, 0.85, 0.76), "grey": (0.62, 0.63, 0.63), "oxblood": (0.45, 0.14, 0.13),
    "teal": (0.16, 0.36, 0.38), "white": (0.93, 0.93, 0.91), "navy": (0.13, 0.17, 0.30),
}


def _frame(art: np.ndarray, rng: np.random.Generator, framed: bool) -> np.ndarray:
    """The artwork inside an optional mat and a bevelled frame."""
    height, width = art.shape[:2]
    side = max(height, width)
    if not framed:  # an unframed print: a thin white border only
        border = max(2, int(0.012 * side))
        out = np.full((height + 2 * border, width + 2 * border, 3), 0.95, np.float32)
        out[border:border + height, border:border + width] = art
        return out
    mat = int(rng.uniform(0.04, 0.10) * side) if rng.random() < 0.35 else 0
    frame_width = max(4, int(rng.uniform(0.035, 0.09) * side))
    colour = np.array(list(FRAME_COLOURS.values())[rng.integers(len(FRAME_COLOURS))], np.float32)
    inner_h, inner_w = height + 2 * mat, width + 2 * mat
    out_h, out_w = inner_h + 2 * frame_width, inner_w + 2 * frame_width
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float32)
    # Distance into the frame from its outer edge; the bevel is lit from the top left.
    depth = np.minimum.reduce([ys, xs, out_h - 1 - ys, out_w - 1 - xs]) / frame_width
    lit = np.where(np.minimum(ys, xs) < np.minimum(out_h - 1 - ys, out_w - 1 - xs), 1.15, 0.8)
    bevel = 1.0 + 0.25 * np.cos(np.clip(depth, 0, 1) * np.pi * 2.0)
    grain = 1.0 + 0.06 * _smooth_noise(rng, (out_h, out_w), 24)
    out = colour[None, None, :] * (lit * bevel * grain)[:, :, None]
    out = out.astype(np.float32)
    out[frame_width:frame_width + inner_h, frame_width:frame_width + inner_w] = 0.93  # mat
    top, left = frame_width + mat, frame_width + mat
    out[top:top + height, left:left + width] = art
    # The frame's lip casts a soft shadow onto the artwork's top and left edges.
    shadow = max(2, frame_width // 3)
    ramp = np.linspace(0.65, 1.0, shadow, dtype=np.float32)
    out[frame_width:frame_width + shadow, frame_width:frame_width + inner_w] *= ramp[:, None, None]
    out[frame_width:frame_width + inner_h, frame_width:frame_width + shadow] *= ramp[None, :, None]
    return np.clip(out, 0.0, 1.0)


def photograph(picture: np.ndarray, rng: np.random.Generator, framed: bool = True,
               long_side: int = QUERY_LONG_SIDE) -> np.ndarray:
    """A visitor's photo of ``picture`` (uint8 RGB) as uint8 RGB, ``long_side`` px on the long side.

    Frame and wall, perspective, uneven light, glare, colour cast, blur, sensor noise. JPEG is
    applied when the photo is saved.
    """
    from scipy.ndimage import gaussian_filter
    from skimage.transform import ProjectiveTransform, warp

    # The artwork fills 55-85% of the photo's long side.
    fill = rng.uniform(0.55, 0.85)
    art = _to_float(_scale_to(picture, max(48, int(long_side * fill))))
    framed_art = _frame(art, rng, framed)
    fh, fw = framed_art.shape[:2]
    portrait = fh > fw * 1.05
    out_h, out_w = (long_side, int(long_side * 0.75)) if portrait else (int(long_side * 0.75),
                                                                         long_side)
    scale = min(out_w * rng.uniform(0.8, 0.95) / fw, out_h * rng.uniform(0.8, 0.95) / fh)
    half_w, half_h = fw * scale / 2, fh * scale / 2
    cx = out_w / 2 + rng.uniform(-0.06, 0.06) * out_w
    cy = out_h / 2 + rng.uniform(-0.06, 0.06) * out_h
    corners = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
    # Viewing angle: one side nearer the camera (bigger), the other further (smaller).
    yaw, pitch = rng.uniform(-0.16, 0.16), rng.uniform(-0.10, 0.10)
    corners[:, 1] *= 1.0 + yaw * np.sign(corners[:, 0])
    corners[:, 0] *= 1.0 + pitch * np.sign(corners[:, 1])
    angle = np.deg2rad(rng.uniform(-5.0, 5.0))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    corners = corners @ rotation.T
    corners += rng.uniform(-0.025, 0.025, size=corners.shape) * np.array([out_w, out_h])
    corners += np.array([cx, cy])
    source_corners = np.array([[0, 0], [fw - 1, 0], [fw - 1, fh - 1], [0, fh - 1]], np.float64)
    transform = ProjectiveTransform(matrix=_homography(source_corners, corners))

    warped = warp(framed_art, transform.inverse, output_shape=(out_h, out_w), order=1,
                  mode="constant", cval=0.0, preserve_range=True).astype(np.float32)
    mask = warp(np.ones((fh, fw), np.float32), transform.inverse, output_shape=(out_h, out_w),
                order=1, mode="constant", cval=0.0, preserve_range=True).astype(np.float32)

    wall_colour = np.array(list(WALL_COLOURS.values())[rng.integers(len(WALL_COLOURS))],
                           np.float32)
    wall = wall_colour[None, None, :] * (
        1.0 + 0.05 * _smooth_noise(rng, (out_h, out_w), 6)
        + 0.02 * rng.standard_normal((out_h, out_w)).astype(np.float32))[:, :, None]
    # Drop shadow of the frame on the wall, offset down and to the right.
    shadow = gaussian_filter(mask, sigma=0.015 * long_side)
    shift = max(2, int(0.012 * long_side))
    shadow = np.pad(shadow, ((shift, 0), (shift, 0)))[:out_h, :out_w]
    wall = wall * (1.0 - 0.45 * shadow)[:, :, None]
    scene = warped * mask[:, :, None] + wall * (1.0 - mask[:, :, None])

    # Uneven lighting: a linear gradient in a random direction plus a vignette.
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float32)
    ys, xs = ys / out_h - 0.5, xs / out_w - 0.5
    direction = rng.uniform(0, 2 * np.pi)
    gradient = np.cos(direction) * xs + np.sin(direction) * ys
    light = (rng.uniform(0.85, 1.1) + rng.uniform(0.2, 0.5) * gradient
             - rng.uniform(0.1, 0.35) * (xs ** 2 + ys ** 2) * 2)
    scene = scene * light[:, :, None]
    # Glare: a bright soft spot on the artwork (screen blend).
    gx, gy = corners[:, 0].mean() / out_w - 0.5, corners[:, 1].mean() / out_h - 0.5
    gx += rng.uniform(-0.25, 0.25)
    gy += rng.uniform(-0.25, 0.25)
    radius = rng.uniform(0.04, 0.12)
    glare = rng.uniform(0.25, 0.65) * np.exp(-((xs - gx) ** 2 + (ys - gy) ** 2) / (2 * radius ** 2))
    scene = 1.0 - (1.0 - np.clip(scene, 0, 1)) * (1.0 - glare[:, :, None])
    # Colour cast of the gallery lights / white balance.
    scene = scene * rng.uniform(0.9, 1.1, size=3).astype(np.float32)[None, None, :]
    # Camera: defocus or shake blur, then shot and read noise.
    sigma = rng.uniform(0.4, 1.4)
    scene = gaussian_filter(scene, sigma=(sigma, sigma * rng.uniform(0.7, 1.4), 0))
    noise_level = rng.uniform(0.008, 0.03)
    scene = scene + (noise_level * np.sqrt(np.clip(scene, 0, 1) + 0.05)
                     * rng.standard_normal(scene.shape).astype(np.float32))
    return _to_uint8(scene)


def _homography(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 3x3 projective matrix taking 4 source points (x, y) onto 4 target points."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(source, target):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    h = np.linalg.solve(np.array(rows, np.float64), np.array(rhs, np.float64))
    return np.append(h, 1.0).reshape(3, 3)


def second_view(picture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another database image of the same exhibit: a tighter crop, differently exposed."""
    height, width = picture.shape[:2]
    keep = rng.uniform(0.75, 0.9)
    crop_h, crop_w = int(height * keep), int(width * keep)
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    view = _to_float(picture[top:top + crop_h, left:left + crop_w])
    view = view * rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    view = np.clip(view, 0, 1) ** rng.uniform(0.85, 1.15)
    return _to_uint8(view)

