"""Do the data's classes match the model's output? One check for calibrate and compare.

Accuracy compares a label (the index of a class folder in sorted order, or an .npz label) with
the argmax of the model's first output (``label_output``: or the first whose classes are the
data's, or the one ``--error-output`` names). When the folder has another number of classes than the
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


def output_classes(outputs: Sequence["TensorSpec"], name: str | None = None) -> int | None:
    """C when the output ``name`` (default: the first) is [N, C] with a static C, else None."""
    spec = next((o for o in outputs if o.name == name), None) if name else (outputs[0] if outputs else None)
    if spec is None:
        return None
    shape = spec.shape
    return shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None


def label_output(source: Any, outputs: Sequence["TensorSpec"], name: str | None = None) -> str | None:
    """The output whose argmax the labels score: ``name`` when given; else the first output, or,
    where its classes do not match the data's, the first [N, C] output whose C does (a model that
    writes its features first and its logits second). None without outputs."""
    if name or not outputs:
        return name or None
    want = _class_count(source)
    if want is not None and output_classes(outputs) != want:
        match = next((o.name for o in outputs if output_classes(outputs, o.name) == want), None)
        if match is not None:
            return match
    return outputs[0].name


def _class_count(source: Any) -> int | None:
    """The number of classes an image folder's labels index (its class folders), or None."""
    classes = getattr(source, "classes", None)
    return len(classes) if classes and getattr(source, "labels", None) is not None else None


def check_classes(source: Any, outputs: Sequence["TensorSpec"], name: str | None = None) -> str | None:
    """Warn (logging) when the source's labels cannot be scored against the output ``name``
    (default: ``label_output``'s choice) [N, C].

    An image folder with labels must have C class folders; labels from an .npz must stay below C
    (labels that cover only some classes are said, and scored: those classes only). An output of
    one value a sample has no argmax to score. Sources without labels are not checked.

    Returns:
        The warning where the accuracy would be meaningless, else None.
    """
    chosen = label_output(source, outputs, name)
    n_out = output_classes(outputs, chosen)
    if n_out is None:
        return None
    if chosen != name and outputs and chosen != outputs[0].name:  # said once, where the check is made
        first = output_classes(outputs)
        log.info("accuracy is read from output %r: its %d classes are the data's (the first output, %r, has %s)",
                 chosen, n_out, outputs[0].name, first if first is not None else "another shape")
    name = chosen
    message = None
    classes = getattr(source, "classes", None)
    labels = getattr(source, "labels", None)
    if labels is None or not len(labels):
        return None
    if n_out == 1:
        message = (f"the model's output {name!r} has one value a sample: no argmax to score labels against, so no "
                   "accuracy is given (compare its SQNR, or threshold it in your own code)")
    elif classes:
        numbered = all(c.isascii() and c.isdigit() and int(c) == i for i, c in enumerate(classes))
        if len(classes) < n_out and numbered:  # folders 0..k-1 of n classes: each its own index
            log.warning("%s has class folders 0..%d of the %d classes of the model's output %r; accuracy covers "
                        "those classes only", getattr(source, "root", "the image folder"), len(classes) - 1, n_out,
                        name)
        elif len(classes) != n_out:
            shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
            message = (f"{getattr(source, 'root', 'the image folder')} has {len(classes)} class folders ({shown}), "
                       f"the model's output {name!r} has {n_out} classes: labels (the folder's index in "
                       "sorted order) will not match the outputs, so accuracy is meaningless; give a folder "
                       "with one sub-folder per output class")
    else:
        values = np.unique(np.asarray(labels))
        if values.max() >= n_out or values.min() < 0:
            message = (f"labels range from {int(values.min())} to {int(values.max())}, the model's output "
                       f"{name!r} has {n_out} classes (0..{n_out - 1}): accuracy is meaningless")
        elif len(values) < n_out:
            log.warning("the labels cover %d of the %d classes of the model's output %r; accuracy covers those "
                        "classes only", len(values), n_out, name)
    if message:
        log.warning("%s", message)
    return message
