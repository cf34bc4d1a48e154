"""Data generated here for the corpus: rendered text and sample photos with text composited in.

Everything is seeded and drawn with Pillow's bundled font, so the same images come out on any
machine; no file is downloaded.
"""
from __future__ import annotations

import numpy as np

#: no glyphs that a Latin font draws alike (0/O, 1/l/I), so a recogniser's mistakes are its own
ALPHABET = "ABCDEFGHJKLMNPRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789"


def random_word(rng: np.random.Generator, lo: int = 3, hi: int = 9) -> str:
    return "".join(rng.choice(list(ALPHABET), size=int(rng.integers(lo, hi))))


def render_text(text: str, *, height: int = 48, rng: np.random.Generator) -> np.ndarray:
    """One text line as a BGR uint8 crop, ``height`` pixels high, dark ink on a light background."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(height * 0.62))
    left, top, right, bottom = font.getbbox(text)
    pad = int(height * 0.25)
    w = right - left + 2 * pad
    bg = tuple(int(v) for v in rng.integers(200, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
    img = Image.new("RGB", (w, height), bg)
    ImageDraw.Draw(img).text((pad - left, (height - (bottom - top)) // 2 - top), text, font=font, fill=ink)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0.0, 4.0, size=arr.shape)  # a little sensor noise
    return np.clip(arr, 0, 255).astype(np.uint8)[:, :, ::-1].copy()


def text_lines(n: int, seed: int, *, height: int = 48, max_ratio: float = 6.5) -> list[tuple[np.ndarray, str]]:
    """``n`` (crop, text) pairs of one or two words, at most ``max_ratio`` wide per unit of height."""
    rng = np.random.default_rng(seed)
    out: list[tuple[np.ndarray, str]] = []
    while len(out) < n:
        text = random_word(rng) if rng.random() < 0.6 else f"{random_word(rng, 2, 6)} {random_word(rng, 2, 5)}"
        img = render_text(text, height=height, rng=rng)
        if img.shape[1] <= max_ratio * height:
            out.append((img, text))
    return out


def _photos() -> list[np.ndarray]:
    """scikit-image's bundled sample photos (RGB uint8), the backgrounds of the scenes."""
    import skimage.data as d

    return [getattr(d, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")]


def text_scenes(n: int, seed: int, *, size: tuple[int, int] = (256, 384), lines: tuple[int, int] = (1, 4)
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (BGR image HxW, boxes [k, 4] x0 y0 x1 y1) scenes: a crop of a sample photo with text
    lines pasted at random places (not overlapping); the boxes are the pasted lines."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    h, w = size
    scenes = []
    for _ in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        y0 = int(rng.integers(0, max(1, photo.shape[0] - h)))
        x0 = int(rng.integers(0, max(1, photo.shape[1] - w)))
        import cv2
        canvas = cv2.resize(photo[y0:y0 + h, x0:x0 + w], (w, h))[:, :, ::-1].copy()
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(lines[0], lines[1] + 1))):
            lh = int(rng.integers(24, 40))
            crop = render_text(random_word(rng, 4, 10), height=lh, rng=rng)
            ch, cw = crop.shape[:2]
            if cw >= w - 8:
                continue
            for _attempt in range(20):
                bx, by = int(rng.integers(4, w - cw - 4)), int(rng.integers(4, h - ch - 4))
                box = (bx, by, bx + cw, by + ch)
                if all(box[2] + 6 < b[0] or b[2] + 6 < box[0] or box[3] + 6 < b[1] or b[3] + 6 < box[1] for b in boxes):
                    canvas[by:by + ch, bx:bx + cw] = crop
                    boxes.append(box)
                    break
        scenes.append((canvas, np.array(boxes, dtype=np.float32).reshape(-1, 4)))
    return scenes
