"""The preprocessing spec: decode result (uint8-range HxWxC BGR or HxW) -> model input array.

Steps, in order: colour conversion, resize of the shorter side and centre crop (or a letterbox:
fit inside the model's size keeping the aspect ratio, pad the rest), scale, mean/std, layout,
dtype. The spec is frozen and serialisable (it is recorded in ranges.json).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from quantkit.errors import InputError, ShapeMismatchError

Color = Literal["rgb", "bgr", "gray"]
Layout = Literal["nchw", "nhwc"]
_INTERP = {"linear": 1, "area": 3, "cubic": 2, "nearest": 0}  # cv2.INTER_* values


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes one sample of the model input.

    Attributes:
        resize: resize so the shorter side has this many pixels (None: no resize).
        crop: centre crop (height, width) after resizing (None: no crop).
        color: channel order given to the model: "rgb", "bgr" or "gray" (1 channel).
        scale: multiply pixel values (0-255 range, whatever the file's bit depth) by this.
        mean, std: per channel, applied after ``scale``: (x * scale - mean) / std.
        layout: "nchw" or "nhwc".
        dtype: "float32", "float16", or "uint8" (a model that takes raw pixels 0-255 and
            normalizes them itself: values rounded and clipped to 0-255).
        interpolation: "linear", "area", "cubic" or "nearest".
        cover: (height, width) to resize to cover, keeping the aspect ratio, when ``resize`` is
            None (the imagenet preset for a model with a non-square input: a shorter-side resize
            left a wide captcha or text-line image narrower than the crop).
        letterbox: (height, width) to fit the whole image inside, keeping the aspect ratio, the
            rest padded with ``pad`` (centred, as YOLO exports' own preprocessing does); instead
            of resize and crop.
        pad: the letterbox's fill, in 0-255 pixel values before ``scale`` (114: ultralytics').
    """

    resize: int | None = None
    crop: tuple[int, int] | None = None
    color: Color = "rgb"
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: Layout = "nchw"
    dtype: Literal["float32", "float16", "uint8"] = "float32"
    interpolation: str = "linear"
    cover: tuple[int, int] | None = None
    letterbox: tuple[int, int] | None = None
    pad: float = 114.0

    def __post_init__(self) -> None:
        if self.letterbox is not None:
            if len(self.letterbox) != 2 or min(self.letterbox) <= 0:
                raise InputError(f"letterbox must be two positive sizes (height, width), got {self.letterbox}")
            if self.resize is not None or self.crop is not None or self.cover is not None:
                raise InputError("a letterbox fits the whole image to the model's size: it takes no --resize or --crop",
                                 hint="drop --resize/--crop, or the letterbox")
        if self.cover is not None and (len(self.cover) != 2 or min(self.cover) <= 0):
            raise InputError(f"cover must be two positive sizes (height, width), got {self.cover}")
        if self.color not in ("rgb", "bgr", "gray"):
            raise InputError(f"colour order must be rgb, bgr or gray, got {self.color!r}")
        if self.layout not in ("nchw", "nhwc"):
            raise InputError(f"layout must be nchw or nhwc, got {self.layout!r}")
        if self.dtype not in ("float32", "float16", "uint8"):
            raise InputError(f"dtype must be float32, float16 or uint8, got {self.dtype!r}")
        if self.interpolation not in _INTERP:
            raise InputError(f"interpolation must be one of {sorted(_INTERP)}, got {self.interpolation!r}")
        if self.resize is not None and self.resize <= 0:
            raise InputError(f"resize must be positive, got {self.resize}")
        if self.crop is not None and (len(self.crop) != 2 or min(self.crop) <= 0):
            raise InputError(f"crop must be two positive sizes (height, width), got {self.crop}")
        n = self.channels
        for label, vals in (("mean", self.mean), ("std", self.std)):
            if len(vals) not in (1, n):
                raise InputError(f"{label} has {len(vals)} values; colour {self.color!r} needs " + ("1" if n == 1 else f"1 or {n}"))
        if any(s == 0 for s in self.std):
            raise InputError("std values must be non-zero")

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    def summary(self) -> str:
        """One line of what is done to each image, for the CLI: 'resize 256, crop 224x224, rgb,
        x 0.00392, mean 0.485,0.456,0.406, std 0.229,0.224,0.225, nchw float32'."""
        def nums(v: tuple[float, ...]) -> str:
            return ",".join(f"{x:.4g}" for x in v)

        fit = [f"letterbox {self.letterbox[0]}x{self.letterbox[1]} (pad {self.pad:g})"] if self.letterbox else \
            [f"resize {self.resize}" if self.resize else "cover" if self.cover else "no resize",
             f"crop {self.crop[0]}x{self.crop[1]}" if self.crop else "no crop"]
        parts = [*fit, self.color,
                 f"x {self.scale:.4g}", f"mean {nums(self.mean)}", f"std {nums(self.std)}", f"{self.layout} {self.dtype}"]
        return ", ".join(parts)

    def replace(self, **changes: Any) -> "Preprocess":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["crop"] = list(self.crop) if self.crop else None
        d["cover"] = list(self.cover) if self.cover else None
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.letterbox is None:  # (as before letterboxes: a cache's recorded preprocessing still matches)
            del d["letterbox"], d["pad"]
        else:
            d["letterbox"] = list(self.letterbox)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        d = dict(d)
        if d.get("crop") is not None:
            d["crop"] = tuple(d["crop"])
        if d.get("cover") is not None:
            d["cover"] = tuple(d["cover"])
        if d.get("letterbox") is not None:
            d["letterbox"] = tuple(d["letterbox"])
        d["mean"], d["std"] = tuple(d.get("mean", (0.0,))), tuple(d.get("std", (1.0,)))
        return cls(**d)

    def _resized_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        if self.resize is None and self.cover is not None:
            h, w = image_hw
            f = max(self.cover[0] / h, self.cover[1] / w)
            return (max(self.cover[0], round(h * f)), max(self.cover[1], round(w * f)))
        if self.resize is None:
            return image_hw
        h, w = image_hw
        f = self.resize / min(h, w)
        return (max(1, round(h * f)), max(1, round(w * f)))

    def _letterboxed(self, img: np.ndarray) -> np.ndarray:
        """``img`` (HxWxC) scaled to fit inside ``letterbox`` keeping its aspect ratio, centred on
        a canvas of ``pad``."""
        import cv2

        assert self.letterbox is not None
        th, tw = self.letterbox
        h, w = img.shape[:2]
        f = min(th / h, tw / w)
        nh, nw = max(1, min(th, round(h * f))), max(1, min(tw, round(w * f)))
        if (nh, nw) != (h, w):
            img = cv2.resize(np.ascontiguousarray(img), (nw, nh), interpolation=_INTERP[self.interpolation])
            if img.ndim == 2:
                img = img[:, :, None]
        canvas = np.full((th, tw, img.shape[2]), self.pad, dtype=np.float32)
        top, left = (th - nh) // 2, (tw - nw) // 2
        canvas[top:top + nh, left:left + nw] = img
        return canvas

    def apply(self, image: np.ndarray, *, source: str = "<image>") -> np.ndarray:
        """Preprocess one decoded image (HxW or HxWxC BGR, values in 0-255 range).

        Returns:
            One sample, CHW or HWC per ``layout``, in ``dtype``.
        """
        import cv2

        img = image
        if img.ndim == 2:
            img = img[:, :, None]
        if self.color == "gray":
            if img.shape[2] == 3:
                img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[:, :, None]
        else:
            if img.shape[2] == 1:
                img = np.repeat(img, 3, axis=2)
            if self.color == "rgb":
                img = img[:, :, ::-1]
        if self.resize is not None or self.cover is not None:
            h, w = img.shape[:2]
            oh, ow = self._resized_hw((h, w))
            if (oh, ow) != (h, w):
                interp = _INTERP[self.interpolation]
                img = cv2.resize(np.ascontiguousarray(img), (ow, oh), interpolation=interp)
                if img.ndim == 2:
                    img = img[:, :, None]
        if self.letterbox is not None:
            img = self._letterboxed(img)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = img.shape[:2]
            if h < ch or w < cw:
                raise ShapeMismatchError(
                    f"{source}: image is {h}x{w} after resizing, smaller than the crop {ch}x{cw}",
                    hint="pass --resize at least as large as the crop",
                )
            top, left = (h - ch) // 2, (w - cw) // 2
            img = img[top : top + ch, left : left + cw]
        mul = np.float32(self.scale) / np.asarray(self.std, dtype=np.float32)
        add = -np.asarray(self.mean, dtype=np.float32) / np.asarray(self.std, dtype=np.float32)
        out: np.ndarray = img.astype(np.float32) * mul + add
        if self.layout == "nchw":
            out = out.transpose(2, 0, 1)
        if self.dtype == "uint8":  # raw pixels for a model that normalizes them itself
            out = np.clip(np.rint(out), 0, 255)
        return np.ascontiguousarray(out, dtype=np.dtype(self.dtype))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS: dict[str, Preprocess] = {
    # crop None here: resolved to the model's spatial size (or 224) by ``for_model``
    "imagenet": Preprocess(resize=256, crop=None, color="rgb", scale=1 / 255, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    # letterbox None here: resolved to the model's spatial size (or 640) by ``for_model``
    "yolo": Preprocess(color="rgb", scale=1 / 255),
    "none": Preprocess(),
}


def preset(name: str) -> Preprocess:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown preprocessing preset {name!r}; available: {sorted(PRESETS)}") from None


def for_model(
    spec: Preprocess, input_shape: tuple[int | str | None, ...], *, input_name: str, preset_name: str | None = None
) -> Preprocess:
    """Fill in what the spec leaves open from the model input, and check what it fixes.

    ``input_shape`` is the ONNX input shape (None or a string for dynamic dims). With the
    ``imagenet`` preset and no crop given, the crop is the model's static H x W (224 x 224 when
    dynamic); the resize (unless given) keeps ImageNet's 256/224 ratio to the crop, given or not.
    """
    if len(input_shape) != 4:
        raise ShapeMismatchError(
            f"input {input_name!r} has shape {list(input_shape)}; image sources need a 4-D input "
            "(N, C, H, W) or (N, H, W, C)",
            hint="use --npz for models with other inputs",
        )
    c_axis, h_axis, w_axis = (1, 2, 3) if spec.layout == "nchw" else (3, 1, 2)
    chans, h, w = input_shape[c_axis], input_shape[h_axis], input_shape[w_axis]
    if isinstance(chans, int) and chans != spec.channels:
        other = "nhwc" if spec.layout == "nchw" else "nchw"
        raise ShapeMismatchError(
            f"input {input_name!r} has shape {list(input_shape)}: {chans} channels in {spec.layout.upper()} "
            f"layout, but colour {spec.color!r} gives {spec.channels}",
            hint=f"set --color (gray for 1 channel) or --layout {other}",
        )
    static_hw = (h, w) if isinstance(h, int) and isinstance(w, int) else None
    if preset_name == "yolo" and spec.letterbox is None and spec.resize is None and spec.crop is None:
        # YOLO exports' own preprocessing: the whole image fitted into the model's size (640 for a free side)
        spec = spec.replace(letterbox=(h if isinstance(h, int) else 640, w if isinstance(w, int) else 640))
    if spec.letterbox is not None:
        for i, dim in enumerate((h, w)):
            if isinstance(dim, int) and spec.letterbox[i] != dim:
                fit = f"{h if isinstance(h, int) else spec.letterbox[0]}x{w if isinstance(w, int) else spec.letterbox[1]}"
                raise ShapeMismatchError(
                    f"input {input_name!r} (shape {list(input_shape)}) expects {'height' if i == 0 else 'width'} "
                    f"{dim}, the letterbox is {spec.letterbox[0]}x{spec.letterbox[1]}", hint=f"pass --letterbox {fit}")
    if preset_name == "imagenet" and spec.letterbox is None and (spec.crop is None or spec.resize == 256):
        # the preset's 256/224 ratio around the crop: the model's (224 x 224 when dynamic), or the one
        # given with --crop (with the preset's resize of 256 a crop above 256 fit no image)
        crop = tuple(spec.crop) if spec.crop is not None else static_hw or (224, 224)
        if spec.resize == 256 and crop[0] != crop[1]:  # a non-square input: cover the crop, then crop the centre
            spec = spec.replace(crop=crop, resize=None, cover=(round(crop[0] * 256 / 224), round(crop[1] * 256 / 224)))
        else:
            spec = spec.replace(crop=crop, resize=spec.resize if spec.resize != 256 else round(min(crop) * 256 / 224))
    if spec.crop is not None and static_hw is not None and tuple(spec.crop) != static_hw:
        raise ShapeMismatchError(
            f"input {input_name!r} expects {static_hw[0]}x{static_hw[1]} images, the preprocessing crops "
            f"{spec.crop[0]}x{spec.crop[1]}",
            hint=f"pass --crop {static_hw[0]}x{static_hw[1]}",
        )
    if spec.crop is not None and static_hw is None:  # one of H, W fixed (a text recogniser's height)
        for i, (axis, dim) in enumerate((("height", h), ("width", w))):
            if isinstance(dim, int) and spec.crop[i] != dim:
                example = f"{dim}x320" if i == 0 else f"320x{dim}"
                raise ShapeMismatchError(
                    f"input {input_name!r} (shape {list(input_shape)}) has a fixed {axis} of {dim}, and the "
                    f"preprocessing crops {spec.crop[0]}x{spec.crop[1]}",
                    hint=f"pass --crop HxW with that {axis} and the size the model reads for the other (e.g. "
                         f"--crop {example}), with --resize and the model's --mean/--std")
    return spec
