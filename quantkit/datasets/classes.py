"""Do the data's classes match the model's first output? One check for calibrate and compare.

Accuracy compares a label (the index of a class folder in sorted order, or an .npz label) with
the argmax of the model's first output. When the folder has another number of classes than the
output, or the labels cover only some of them, labels and outputs do not line up (a skipped
or extra class folder shifts every label after it) and the accuracy says nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from quantkit.onnx.model import TensorSpec

log = logging.getLogger(__name__)


def output_classes(outputs: Sequence["TensorSpec"]) -> int | None:
    """C when the first output is [N, C] with a static C, else None."""
    if not outputs:
        return None
    shape = outputs[0].shape
    return shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None


def check_classes(source: Any, outputs: Sequence["TensorSpec"]) -> str | None:
    """Warn (logging) when the source's classes do not match the model's first output [N, C].

    An image folder with labels must have C class folders; labels from an .npz must cover all C
    classes and stay below C. Sources without labels are not checked.

    Returns:
        The warning, or None when there is nothing to say.
    """
    n_out = output_classes(outputs)
    if n_out is None:
        return None
    name = outputs[0].name
    message = None
    classes = getattr(source, "classes", None)
    if classes and getattr(source, "labels", None) is not None:
        if len(classes) != n_out:
            shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
            message = (f"{getattr(source, 'root', 'the image folder')} has {len(classes)} class folders ({shown}), "
                       f"the model's first output {name!r} has {n_out} classes: labels (the folder's index in "
                       "sorted order) will not match the outputs, so accuracy is meaningless; give a folder "
                       "with one sub-folder per output class")
    else:
        labels = getattr(source, "labels", None)
        if labels is not None and len(labels):
            values = np.unique(np.asarray(labels))
            if values.max() >= n_out or values.min() < 0:
                message = (f"labels range from {int(values.min())} to {int(values.max())}, the model's first output "
                           f"{name!r} has {n_out} classes (0..{n_out - 1}): accuracy is meaningless")
            elif len(values) < n_out:
                message = (f"the labels cover {len(values)} of the {n_out} classes of the model's first output "
                           f"{name!r}; accuracy covers those classes only")
    if message:
        log.warning("%s", message)
    return message
