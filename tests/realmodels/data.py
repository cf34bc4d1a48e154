"""Data generated here for the corpus: rendered text and sample photos with text composited in.

Everything is seeded and drawn with Pillow's bundled font, so the same images come out on any
machine; no file is downloaded.
"""
from __future__ import annotations

from collections.abc import Collection

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


def khmer_text(n: int, seed: int, alphabet: Collection[str], length: int = 48) -> list[str]:
    """``n`` strings of ``length`` Khmer characters: syllables of a consonant, now and then a
    subscript consonant (coeng + consonant), and mostly a dependent vowel; only characters of
    ``alphabet`` (a model's vocabulary)."""
    consonants = [chr(c) for c in range(0x1780, 0x17A3) if chr(c) in alphabet]
    vowels = [chr(c) for c in range(0x17B6, 0x17C6) if chr(c) in alphabet]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = ""
        while len(text) < length:
            text += rng.choice(consonants) + ("\u17d2" + rng.choice(consonants) if rng.random() < 0.2 else "")
            text += rng.choice(vowels) if rng.random() < 0.7 else ""
        out.append(text[:length])
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


# ------------------------------------------------------------------ document pages (layout detection)
def doc_pages(n: int, seed: int, *, size: tuple[int, int] = (842, 595)) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
    """``n`` (BGR page HxW, boxes [k, 4] x0 y0 x1 y1, labels) rendered document pages: a title line,
    then paragraphs of random words and figures (sample photos) down the page; the boxes are the
    rendered title, each paragraph's text extent and each figure, labelled as CDLA's classes
    ("title", "text", "figure")."""
    import cv2
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    photos = _photos()
    h, w = size
    out = []
    for _ in range(n):
        img = Image.new("RGB", (w, h), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        boxes: list[tuple[float, ...]] = []
        labels: list[str] = []
        y, margin = int(rng.integers(40, 70)), int(rng.integers(40, 70))
        tfont = ImageFont.load_default(size=int(rng.integers(22, 30)))
        title = " ".join(random_word(rng, 3, 9) for _ in range(int(rng.integers(2, 5))))
        box = draw.textbbox((margin, y), title, font=tfont)
        draw.text((margin, y), title, font=tfont, fill=(0, 0, 0))
        boxes.append(box)
        labels.append("title")
        y = box[3] + 25
        font = ImageFont.load_default(size=int(rng.integers(11, 14)))
        while y < h - 120:
            if rng.random() < 2 / 3:  # a paragraph
                x1 = y1 = 0
                y0, lines = y, int(rng.integers(3, 9))
                for i in range(lines):
                    words: list[str] = []
                    while True:
                        word = random_word(rng, 2, 9).lower()
                        if draw.textlength(" ".join([*words, word]), font=font) > w - 2 * margin:
                            break
                        words.append(word)
                    if i == lines - 1:
                        words = words[: max(2, len(words) // 2)]
                    line = " ".join(words)
                    _, _, r, b = draw.textbbox((margin, y), line, font=font)
                    draw.text((margin, y), line, font=font, fill=(20, 20, 20))
                    x1, y1, y = max(x1, r), b, b + 5
                if y1 > h - 40:
                    break
                boxes.append((margin, y0, x1, y1))
                labels.append("text")
                y += 18
            else:  # a figure
                photo = photos[int(rng.integers(len(photos)))]
                fw = int(rng.integers(200, w - 2 * margin))
                fh = int(fw * rng.uniform(0.5, 0.8))
                if y + fh > h - 60:
                    break
                x0 = (w - fw) // 2
                img.paste(Image.fromarray(cv2.resize(photo, (fw, fh))), (x0, y))
                boxes.append((x0, y, x0 + fw, y + fh))
                labels.append("figure")
                y += fh + 25
        out.append((np.asarray(img)[:, :, ::-1].copy(), np.array(boxes, np.float32).reshape(-1, 4), labels))
    return out


# ------------------------------------------------------------------ files of known content types (magika)
_WORDS = ("alpha", "beta", "gamma", "delta", "count", "value", "total", "index", "name", "price", "user", "item",
          "order", "level", "score", "color", "width", "height", "start", "end")


def _w(rng: np.random.Generator) -> str:
    return str(rng.choice(_WORDS))


def _python(rng):
    fns = []
    for _ in range(int(rng.integers(2, 5))):
        a, b = _w(rng), _w(rng)
        fns.append(f"def {a}_{b}({a}, {b}=None):\n    \"\"\"Return the {a} of {b}.\"\"\"\n    if {b} is None:\n"
                   f"        return [{a} * i for i in range({int(rng.integers(2, 9))})]\n    return {a} + {b}\n")
    return "import os\nimport sys\n\n\n" + "\n\n".join(fns) + "\n\nif __name__ == \"__main__\":\n    print(sys.argv)\n"


def _javascript(rng):
    body = "".join(f"  const {_w(rng)}{i} = items.filter((x) => x.{_w(rng)} > {int(rng.integers(9))});\n"
                   for i in range(int(rng.integers(3, 7))))
    return f"'use strict';\n\nfunction {_w(rng)}Handler(items) {{\n{body}  return items.length;\n}}\n\n" \
           f"module.exports = {{ handler: {_w(rng)}Handler }};\n"


def _json(rng):
    import json
    rows = [{_w(rng): int(rng.integers(1000)), _w(rng): _w(rng), "ok": bool(rng.random() < 0.5)}
            for _ in range(int(rng.integers(3, 12)))]
    return json.dumps({"data": rows, "version": int(rng.integers(1, 5))}, indent=2)


def _html(rng):
    items = "".join(f"      <li class=\"{_w(rng)}\">{_w(rng)} {_w(rng)}</li>\n" for _ in range(int(rng.integers(3, 9))))
    return f"<!DOCTYPE html>\n<html lang=\"en\">\n  <head>\n    <meta charset=\"utf-8\">\n    <title>{_w(rng)}</title>\n" \
           f"  </head>\n  <body>\n    <h1>{_w(rng).title()}</h1>\n    <ul>\n{items}    </ul>\n  </body>\n</html>\n"


def _xml(rng):
    items = "".join(f"  <entry id=\"{i}\" kind=\"{_w(rng)}\">{_w(rng)}</entry>\n" for i in range(int(rng.integers(3, 10))))
    root = _w(rng)
    return f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{root}list>\n{items}</{root}list>\n"


def _csv(rng):
    cols = [_w(rng) for _ in range(int(rng.integers(3, 6)))]
    rows = [",".join(str(int(rng.integers(1000))) if j else _w(rng) for j in range(len(cols)))
            for _ in range(int(rng.integers(8, 30)))]
    return ",".join(cols) + "\n" + "\n".join(rows) + "\n"


def _markdown(rng):
    return f"# {_w(rng).title()} {_w(rng)}\n\nThis is the {_w(rng)} of the {_w(rng)}.\n\n## Usage\n\n" + \
        "".join(f"- **{_w(rng)}**: set the {_w(rng)} to `{int(rng.integers(100))}`\n" for _ in range(int(rng.integers(3, 7)))) + \
        f"\nSee [the docs](https://example.org/{_w(rng)}) for more.\n"


def _c(rng):
    body = "".join(f"    {_w(rng)}[{i}] = {_w(rng)} * {int(rng.integers(9))};\n" for i in range(int(rng.integers(3, 7))))
    return f"#include <stdio.h>\n#include <stdlib.h>\n\nstatic int {_w(rng)}(int *{_w(rng)}, int n)\n{{\n" \
           f"    int i;\n{body}    return 0;\n}}\n\nint main(void)\n{{\n    printf(\"%d\\n\", 42);\n    return 0;\n}}\n"


def _shell(rng):
    return "#!/bin/bash\nset -euo pipefail\n\n" + "".join(
        f"if [ -f \"${{{_w(rng).upper()}}}\" ]; then\n  echo \"{_w(rng)}\"\n  cp \"$1\" /tmp/{_w(rng)}\nfi\n"
        for _ in range(int(rng.integers(2, 5))))


#: magika's label for each generator
CONTENT_TYPES = {"python": _python, "javascript": _javascript, "json": _json, "html": _html, "xml": _xml,
                 "csv": _csv, "markdown": _markdown, "c": _c, "shell": _shell}


def typed_files(n: int, seed: int) -> list[tuple[bytes, str]]:
    """``n`` (content, magika label) pairs, the types in turn."""
    rng = np.random.default_rng(seed)
    labels = list(CONTENT_TYPES)
    return [(CONTENT_TYPES[labels[i % len(labels)]](rng).encode(), labels[i % len(labels)]) for i in range(n)]


# ------------------------------------------------------------------ paraphrase pairs (sentence embeddings)
_SUBJ = ("the old farmer", "a young doctor", "my neighbour", "the tall student", "our teacher", "the busy chef",
         "a quiet engineer", "the small child", "the angry driver", "a famous singer")
_VERB = (("repaired", "was repaired"), ("painted", "was painted"), ("sold", "was sold"), ("cleaned", "was cleaned"),
         ("bought", "was bought"), ("found", "was found"), ("lost", "was lost"), ("opened", "was opened"))
_OBJ = ("the red bicycle", "a wooden table", "the broken window", "an old piano", "the blue car", "a garden gate",
        "the kitchen door", "a leather bag", "the village bakery", "an iron bridge")
_WHEN = ("yesterday", "last week", "this morning", "on sunday", "in the evening", "after lunch")


def paraphrase_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (sentence, paraphrase) pairs: an active sentence and its passive rewording."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s, (v, pv), o, w = (_SUBJ[rng.integers(len(_SUBJ))], _VERB[rng.integers(len(_VERB))],
                            _OBJ[rng.integers(len(_OBJ))], _WHEN[rng.integers(len(_WHEN))])
        out.append((f"{s.capitalize()} {v} {o} {w}.", f"{w.capitalize()}, {o} {pv} by {s}."))
    return out


# ------------------------------------------------------------------ voiced audio (VAD)
#: formants F1-F3 (Hz) of English vowels (Peterson & Barney): /a i u e o ae uh/
_VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410),
           (660, 1720, 2410), (440, 1020, 2240))


def voiced_audio(n_chunks: int, seed: int, *, sr: int = 16000, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """``n_chunks`` chunks [n, 512] of 16 kHz audio and their truth (True = speech): utterances of
    2-6 syllables (a fricative hiss, then a voiced vowel: a glottal pulse train with jitter and
    falling pitch through three formant resonators gliding between real vowels' formants) between
    0.4-1 s of low noise. A synthetic voice, but voiced, harmonic and syllabic as speech is."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    total = n_chunks * chunk
    audio = rng.normal(0.0, 0.003, total)
    truth = np.zeros(total, bool)
    pos = int(sr * 0.3)
    while pos < total:
        start = pos
        f0_base = rng.uniform(95, 230)
        for _ in range(int(rng.integers(2, 7))):  # syllables: consonant burst + vowel
            if pos >= total:
                break
            cons = int(rng.uniform(0.03, 0.08) * sr)
            end = min(total, pos + cons)
            noise = rng.normal(0, 1, end - pos)
            noise = lfilter([1, -0.95], [1], noise)  # hiss (fricative)
            audio[pos:end] += 0.03 * noise / (np.abs(noise).max() + 1e-9) * rng.uniform(0.3, 1)
            pos = end
            length = int(rng.uniform(0.12, 0.3) * sr)
            end = min(total, pos + length)
            n = end - pos
            if n < 16:
                pos = end
                break
            t = np.arange(n) / sr
            f0 = f0_base * (1 + rng.uniform(-0.15, 0.15)) * (1 - 0.1 * t / max(t[-1], 1e-3)) * (1 + 0.01 * rng.normal(size=n))
            phase = np.cumsum(f0 / sr)
            src = (np.diff(np.floor(phase), prepend=0) > 0).astype(float)
            src = lfilter([1.0], [1.0, -0.97], src)  # glottal roll-off
            src += 0.02 * rng.normal(size=n)  # breath
            va, vb = _VOWELS[rng.integers(len(_VOWELS))], _VOWELS[rng.integers(len(_VOWELS))]
            sig = np.zeros(n)
            for k, bw in enumerate((90, 110, 170)):
                # formant glides from one vowel to the next, in 8 segments
                out = np.zeros(n); zi = np.zeros(2)
                for s in range(8):
                    a0, a1 = s * n // 8, (s + 1) * n // 8
                    f = va[k] + (vb[k] - va[k]) * s / 7
                    r = np.exp(-np.pi * bw / sr)
                    out[a0:a1], zi = lfilter([1.0], [1.0, -2 * r * np.cos(2 * np.pi * f / sr), r * r], src[a0:a1], zi=zi)
                sig += out * (1.0, 0.6, 0.3)[k]
            env = np.sin(np.pi * np.clip(t / max(t[-1], 1e-3), 0, 1)) ** 0.6
            sig = sig * env
            audio[pos:end] += rng.uniform(0.15, 0.4) * sig / (np.abs(sig).max() + 1e-9)
            pos = end + int(rng.uniform(0.0, 0.05) * sr)
        truth[start:min(pos, total)] = True
        pos += int(rng.uniform(0.4, 1.0) * sr)
    chunks = audio.astype(np.float32).reshape(n_chunks, chunk)
    return chunks, truth.reshape(n_chunks, chunk).mean(axis=1) > 0.5
