"""INT8 vs FP32 checks: task accuracy, and per-output agreement, streamed batch by batch.

Metrics per output (reference = FP32):
  - top-1 agreement: share of samples whose argmax agrees (2-D outputs [N, classes] only)
  - cosine similarity: per sample, then mean (and min) over samples
  - SQNR (dB): 10 log10(sum ref^2 / sum (ref - test)^2) over all values
  - max and mean absolute error
Accuracy against labels is computed on the first output when labels exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from quantkit._values import comparable
from quantkit.backends.base import Runner, side_by_side
from quantkit.datasets.batching import Batch
from quantkit.errors import ModelError
from quantkit.onnx.model import dims_text, fixed_batch


@dataclass(frozen=True)
class OutputMetrics:
    name: str
    cosine_mean: float
    cosine_min: float
    sqnr_db: float
    max_abs_error: float
    mean_abs_error: float
    top1_agreement: float | None
    #: batches on which the two models' outputs had different shapes (a data-dependent shape: boxes
    #: after NonMaxSuppression, NonZero), left out of the figures above
    shape_differs: int = 0
    batches: int = 0
    #: an integer or bool output (class ids from an in-graph ArgMax, counts, flags): the share of
    #: its elements equal to FP32's (its SQNR, cosine and top-1 are not computed: None/NaN)
    match: float | None = None
    #: the share of its samples equal to FP32's in every element (integer or bool outputs)
    exact_samples: float | None = None
    #: computed through a TopK: rows pair up with FP32's by rank, not by object, and near ties
    #: reorder them, so its figures read lower than the error INT8 adds
    value_ordered: bool = False
    #: for an output [N, C, ...] of 2..MAX_CHANNELS channels (axis 1): the channel with the lowest
    #: SQNR and that SQNR. One SQNR of an output that holds values of different scales reads as its
    #: largest ones: a YOLO output [N, 4 + classes, anchors] is its boxes' pixels, and INT8 that
    #: loses every detection (class channels at 0 dB) read 22 dB there
    worst_channel: int | None = None
    worst_channel_sqnr_db: float | None = None
    #: for an output a Concat writes along axis 1 (``quantkit.onnx.model.concat_parts``): each
    #: part's channel count and SQNR (its channels pooled): a YOLO output's boxes, class scores and
    #: mask coefficients, each as one signal
    parts: list[int] | None = None
    parts_sqnr_db: list[float] | None = None
    #: ``top1_agreement`` is per position: a Softmax over the last axis of a rank-3+ output (a CTC
    #: recogniser's ``[N, T, classes]``: at each of its T steps)
    top1_per_position: bool = False
    #: a few values a sample (``[N, k]``, k < 10) that no Softmax writes (``few_regression_values``):
    #: classes or figures (scores, a box) alike, so its top-1 agreement may mean nothing
    top1_few_values: bool = False
    #: k > 1 where every batch's output had one row for every k samples fed (a model that combines
    #: a batch's rows: ICLabel averages each component's four), else 1
    rows_per: int = 1

    @property
    def worst_part(self) -> tuple[int, int, float] | None:
        """The Concat part (first and last channel of axis 1, SQNR) that reads more than
        ``WORST_CHANNEL_GAP_DB`` below the whole output, whose SQNR its largest values make;
        None where no part does (or the output is no Concat's)."""
        if not self.parts or not self.parts_sqnr_db or min(self.parts_sqnr_db) >= self.sqnr_db - WORST_CHANNEL_GAP_DB:
            return None
        i = int(np.argmin(self.parts_sqnr_db))
        start = int(sum(self.parts[:i]))
        return start, start + self.parts[i] - 1, float(self.parts_sqnr_db[i])


@dataclass(frozen=True)
class CompareReport:
    """The result of comparing a test model (INT8) with a reference (FP32) on one data set."""

    reference: str
    test: str
    num_samples: int
    outputs: list[OutputMetrics]
    accuracy_reference: float | None = None
    accuracy_test: float | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: graph outputs that are not tensors (sequences, maps), left out of the figures
    not_compared: list[str] = field(default_factory=list)
    #: classes of the labelled output (its axis 1), where accuracy was measured
    classes: int | None = None

    @property
    def chance_level(self) -> bool:
        """The reference scores no better than chance on the labels, with at least two samples a
        class: labels of other classes (folders named or ordered after another model's)."""
        return (self.accuracy_reference is not None and self.classes is not None and self.classes >= 2
                and self.num_samples >= 2 * self.classes and self.accuracy_reference <= 1.0 / self.classes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skipped"] = [{"file": f, "reason": r} for f, r in self.skipped]
        return d

    def table(self) -> str:
        """A short human-readable table."""
        lines = [f"{self.test} vs {self.reference} on {self.num_samples} samples"]
        if self.accuracy_reference is not None:
            lines.append(f"  accuracy: reference {self.accuracy_reference:.4f}  test {self.accuracy_test:.4f}")
            if self.chance_level:
                lines.append(f"  note: the reference scores no better than chance (1 in {self.classes}) on these labels: "
                             "they do not look like the labels of the model's classes (check the class folders' "
                             "names and order), so both accuracies mean nothing; the agreement figures hold")
        w = min(NAME_WIDTH[1], max([NAME_WIDTH[0], *(len(m.name) for m in self.outputs)]))
        lines.append(f"  {'output':<{w}} {'top-1 agree':>11} {'cos mean':>9} {'cos min':>8} {'SQNR dB':>8} {'max abs err':>11}")
        for m in self.outputs:
            if m.match is not None:
                err = "-" if math.isnan(m.max_abs_error) else f"{m.max_abs_error:.4g}"
                lines.append(f"  {short_name(m.name, w):<{w}} {'-':>11} {'-':>9} {'-':>8} {'-':>8} {err:>11}")
                continue
            agree = f"{m.top1_agreement:.4f}" if m.top1_agreement is not None else "-"
            cos = ("-", "-") if math.isnan(m.cosine_mean) else (f"{m.cosine_mean:.5f}", f"{m.cosine_min:.5f}")
            db = "-" if math.isnan(m.sqnr_db) else f"{m.sqnr_db:.2f}"  # nothing compared: no figure
            err = "-" if math.isnan(m.max_abs_error) else f"{m.max_abs_error:.4g}"
            lines.append(f"  {short_name(m.name, w):<{w}} {agree:>11} {cos[0]:>9} {cos[1]:>8} {db:>8} {err:>11}")
        for m in self.outputs:
            if m.match is not None:
                lines.append(f"  note: {m.name!r} holds integers, flags or text (class ids, counts, labels): "
                             f"{m.match:.4f} of its elements and {m.exact_samples:.4f} of the samples equal FP32's "
                             "(no SQNR or cosine)")
            if m.value_ordered:
                lines.append(f"  note: {m.name!r} is computed through a TopK: its rows pair up with FP32's by rank, "
                             "not by object, and near ties reorder them, so its figures read lower than the "
                             "error INT8 adds (compare the tensor before the TopK, e.g. with `quantkit debug`)")
        for m in self.outputs:
            if m.worst_part is not None and m.parts and m.parts_sqnr_db:
                edges = np.cumsum([0, *m.parts])
                each = ", ".join(f"channels {a}-{b - 1}: {db:.2f} dB" for a, b, db in zip(edges, edges[1:], m.parts_sqnr_db))
                lines.append(f"  note: {m.name!r} is a Concat of {len(m.parts)} parts (axis 1; {each}) against "
                             f"{m.sqnr_db:.2f} dB for the whole output: its SQNR reads as its largest values (a "
                             "detector's boxes in pixels beside its class scores); judge it by its worst part")
            elif m.worst_channel_sqnr_db is not None and m.worst_channel_sqnr_db < m.sqnr_db - WORST_CHANNEL_GAP_DB \
                    and m.top1_per_position:  # a recogniser's [N, T, classes]: axis 1 is its time steps
                lines.append(f"  note: {m.name!r} position {m.worst_channel} of axis 1 (a time step) is at "
                             f"{m.worst_channel_sqnr_db:.2f} dB against {m.sqnr_db:.2f} dB for the whole output")
            elif m.worst_channel_sqnr_db is not None and m.worst_channel_sqnr_db < m.sqnr_db - WORST_CHANNEL_GAP_DB:
                lines.append(f"  note: {m.name!r} index {m.worst_channel} of axis 1 is at {m.worst_channel_sqnr_db:.2f} dB "
                             f"against {m.sqnr_db:.2f} dB for the whole output: its SQNR reads as its largest values "
                             "(where axis 1 is a detector's channels, its boxes in pixels beside its class scores; "
                             "else an anchor, a position); check what that index holds (scores, detections) before "
                             "trusting the figure")
        for m in self.outputs:
            if m.top1_few_values:
                lines.append(f"  note: output {m.name!r}: its top-1 agreement is the argmax of its few values a sample, which no "
                             "Softmax writes: it means something only if they are class scores, not figures (scores, "
                             "a box); its SQNR holds either way (--max-drop's default metric for it)")
            if m.top1_per_position:
                lines.append(f"  note: output {m.name!r}: its top-1 agreement is per position: the argmax of its last axis (the "
                             "classes of a Softmax or of a linear layer's logits) at each position before it, as a "
                             "recogniser's time steps; near ties flip where the SQNR reads high")
            if m.rows_per > 1:
                lines.append(f"  note: {m.name!r} has one row for every {m.rows_per} samples fed: the model combines "
                             f"the rows of a batch, so its figures are over {self.num_samples // m.rows_per} rows, and "
                             "which samples a batch combines follows the order they are drawn in (--order sorted: "
                             "the data's own; the default draws from across it)")
            if m.shape_differs:
                lines.append(f"  note: {m.name!r} has a data-dependent shape: the models' shapes differ on "
                             f"{m.shape_differs} of {m.batches} batch(es), left out of its figures"
                             + (" (all of them: no figures)" if m.shape_differs == m.batches else ""))
        if self.not_compared:
            lines.append(f"  note: {', '.join(map(repr, self.not_compared))} not compared: not a tensor (a sequence "
                         "or a map, such as skl2onnx's ZipMap of class probabilities); compare the tensor it is made from")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} unreadable file(s); first: {self.skipped[0][0]}")
        return "\n".join(lines)


#: outputs of at most this many channels (axis 1) get per-channel SQNR (a detector's 4 + 80 classes
#: + 32 mask coefficients; not a recogniser's 6625 classes on axis 2)
MAX_CHANNELS = 1024
#: the table names the worst channel when it is this far below the whole output's SQNR
WORST_CHANNEL_GAP_DB = 10.0
#: the output column's width in the table: at least the first, at most the second (a longer name
#: keeps its head and tail: tf2onnx's outputs differ in their last characters only,
#: ``StatefulPartitionedCall_1:0`` and ``:1``)
NAME_WIDTH = (24, 48)


def short_name(name: str, width: int) -> str:
    """``name`` as it fits in ``width`` characters: whole, or its head and tail around "..."."""
    if len(name) <= width:
        return name
    tail = (width - 3) // 2
    return f"{name[:width - 3 - tail]}...{name[len(name) - tail:]}"


class _OutputStats:
    """Streaming accumulators for one output."""

    def __init__(self, name: str, per_position: bool = False):
        self.name = name
        #: rank 3+, a Softmax over the last axis (``last_axis_classes``): top-1 at each position
        self.per_position = per_position
        self.positions = 0
        self.cos_sum = 0.0
        self.cos_min = math.inf
        self.sig = 0.0
        self.noise = 0.0
        self.max_abs = 0.0
        self.abs_sum = 0.0
        self.values = 0
        self.samples = 0
        self.agree = 0
        self.classifier = True
        self.batches = 0
        self.shape_differs = 0
        self.discrete: bool | None = None
        self.one_value = True  # one value a sample (a score, a regression): its cosine is only a sign
        self.equal = 0
        self.equal_samples = 0
        self.channel_sig: np.ndarray | None = None  # per channel (axis 1) of an [N, C, ...] output
        self.channel_noise: np.ndarray | None = None

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        self.batches += 1
        if np.shape(ref) != np.shape(test):  # a data-dependent shape (NMS boxes): nothing to pair up
            self.shape_differs += 1
            return
        if self.discrete is None:
            self.discrete = not np.issubdtype(np.asarray(ref).dtype, np.floating)
        if np.asarray(ref).dtype.kind in "OUS":  # text (a STRING output: labels, tokens): equal or not
            self.max_abs = math.nan  # (no difference to measure)
            same = np.asarray(ref).reshape(len(ref), -1) == np.asarray(test).reshape(len(test), -1)
            self.samples += len(ref)
            self.values += same.size
            self.equal += int(same.sum())
            self.equal_samples += int(same.all(axis=1).sum())
            return
        r, t = comparable(ref.reshape(ref.shape[0], -1), test.reshape(test.shape[0], -1))
        diff = r - t
        absd = np.abs(diff)
        self.max_abs = max(self.max_abs, float(absd.max()) if absd.size else 0.0)
        self.abs_sum += float(absd.sum())
        self.values += absd.size
        self.samples += r.shape[0]
        if self.discrete:  # ids, counts, flags: equal or not (the rest below is for float values)
            same = ref.reshape(len(ref), -1) == test.reshape(len(test), -1)
            self.equal += int(same.sum())
            self.equal_samples += int(same.all(axis=1).sum())
            return
        self.one_value = self.one_value and r.shape[1] == 1
        nr, nt = np.linalg.norm(r, axis=1), np.linalg.norm(t, axis=1)
        dots = (r * t).sum(axis=1)
        both_zero = (nr == 0) & (nt == 0)
        cos = np.where(both_zero, 1.0, dots / np.maximum(nr * nt, 1e-300))
        self.cos_sum += float(cos.sum())
        self.cos_min = min(self.cos_min, float(cos.min()))
        self.sig += float((r * r).sum())
        self.noise += float((diff * diff).sum())
        if ref.ndim >= 3 and 2 <= ref.shape[1] <= MAX_CHANNELS:
            r3, d3 = r.reshape(ref.shape[0], ref.shape[1], -1), diff.reshape(ref.shape[0], ref.shape[1], -1)
            sig_c, noise_c = (r3 * r3).sum(axis=(0, 2)), (d3 * d3).sum(axis=(0, 2))
            if self.channel_sig is None or self.channel_noise is None:
                self.channel_sig, self.channel_noise = sig_c, noise_c
            elif self.channel_sig.shape == sig_c.shape:
                self.channel_sig, self.channel_noise = self.channel_sig + sig_c, self.channel_noise + noise_c
        if ref.ndim == 2 and ref.shape[1] > 1:
            self.agree += int((r.argmax(axis=1) == t.argmax(axis=1)).sum())  # (masked values read 0 on both sides)
        elif self.per_position and ref.ndim >= 3 and ref.shape[-1] > 1:  # classes at each of T steps
            self.agree += int((np.asarray(ref).argmax(axis=-1) == np.asarray(test).argmax(axis=-1)).sum())
            self.positions += int(np.prod(ref.shape[:-1]))
        else:
            self.classifier = False

    def result(self, value_ordered: bool = False, *, top1: bool = True, parts: Sequence[int] = (),
               few_values: bool = False) -> OutputMetrics:
        n = max(self.samples, 1)
        # nothing compared (every batch's shapes differed): no error figure, not an error of 0
        # (the eleventh probe: a script read compare --json's 0.0 as perfect agreement)
        max_abs = self.max_abs if self.values else math.nan
        mean_abs = self.abs_sum / self.values if self.values else math.nan
        if self.discrete:
            return OutputMetrics(self.name, math.nan, math.nan, math.nan, max_abs, mean_abs, None,
                                 self.shape_differs, self.batches,
                                 self.equal / max(self.values, 1), self.equal_samples / n, value_ordered)
        if not self.samples:
            sqnr = math.nan
        elif self.noise == 0.0:
            sqnr = math.inf
        elif self.sig == 0.0:
            sqnr = -math.inf
        else:
            sqnr = 10.0 * math.log10(self.sig / self.noise)
        cos_ok = self.samples and not self.one_value
        worst, worst_db = None, None
        if self.channel_sig is not None and self.channel_noise is not None:
            live = self.channel_sig > 0  # a channel that is 0 in FP32 has no SQNR
            if live.any():
                with np.errstate(divide="ignore"):
                    per = np.where(self.channel_noise[live] > 0,
                                   10.0 * np.log10(self.channel_sig[live] / np.maximum(self.channel_noise[live], 1e-300)),
                                   np.inf)
                k = int(np.argmin(per))
                worst, worst_db = int(np.flatnonzero(live)[k]), float(per[k])
        part_db: list[float] | None = None
        if self.channel_sig is not None and self.channel_noise is not None and len(parts) >= 2 and \
                sum(parts) == self.channel_sig.size:
            edges = np.cumsum([0, *parts])[:-1]
            part_db = [_db(float(a), float(b)) for a, b in zip(np.add.reduceat(self.channel_sig, edges),
                                                               np.add.reduceat(self.channel_noise, edges))]
        agreement = (self.agree / max(self.positions, 1) if self.per_position else self.agree / n) \
            if self.classifier and self.samples and top1 else None
        return OutputMetrics(
            self.name, self.cos_sum / n if cos_ok else math.nan, self.cos_min if cos_ok else math.nan, sqnr,
            max_abs, mean_abs, agreement, self.shape_differs, self.batches,
            value_ordered=value_ordered, worst_channel=worst, worst_channel_sqnr_db=worst_db,
            parts=list(parts) if part_db is not None else None, parts_sqnr_db=part_db,
            top1_per_position=self.per_position and self.classifier and bool(self.positions),
            top1_few_values=few_values and agreement is not None,
        )


def _db(signal: float, noise: float) -> float:
    """10 log10(signal / noise), inf for an exact part, -inf for a silent one with an error."""
    if noise == 0.0:
        return math.inf if signal > 0.0 else math.nan
    return 10.0 * math.log10(signal / noise) if signal > 0.0 else -math.inf


def comparison_batch(reference: Runner, test: Runner, batch_size: int, *, reference_name: str = "fp32",
                     test_name: str = "int8", axes: Mapping[str, int | None] | None = None) -> tuple[int, bool]:
    """The batch size both models can run, and whether it is fixed (then a short last batch is
    padded, and the padding rows are left out of the metrics).

    A model with a fixed batch dim (``quantkit.onnx.model.fixed_batch``, on the data's batch
    ``axes``) sets the batch; two fixed batch dims must agree.

    Raises:
        ModelError: the two models have different fixed batch sizes.
    """
    fixed = {name: fixed_batch(r.input_specs, axes) for name, r in ((reference_name, reference), (test_name, test))
             if r.input_specs}
    sizes = {b for b in fixed.values() if b is not None}
    if len(sizes) > 1:
        raise ModelError(
            "the models have different fixed batch sizes: "
            + ", ".join(f"{name} a fixed batch size of {b}" for name, b in fixed.items()),
            hint="export one of them with a dynamic batch dim, or both with the same batch size",
        )
    return (sizes.pop(), True) if sizes else (batch_size, False)


def _check_output_shapes(reference: Runner, test: Runner, reference_name: str, test_name: str) -> None:
    """Outputs both models declare with different ranks or different fixed dims: not one model and
    its INT8 form ([N, 4] against [N, 8, 1, 1] was run and reported as a data-dependent shape)."""
    specs = {s.name: s for s in getattr(test, "output_specs", None) or []}
    for ref in getattr(reference, "output_specs", None) or []:
        other = specs.get(ref.name)
        if other is None or not ref.shape or not other.shape:
            continue
        fixed = [(a, b) for a, b in zip(ref.shape[1:], other.shape[1:]) if isinstance(a, int) and isinstance(b, int)]
        if len(ref.shape) != len(other.shape) or any(a != b for a, b in fixed):
            raise ModelError(f"output {ref.name!r} is {dims_text(ref.shape)} in {reference_name} and "
                             f"{dims_text(other.shape)} in {test_name}",
                             hint="compare an INT8 model with the FP32 model it was made from")


def compare_runners(
    reference: Runner,
    test: Runner,
    batches: Iterable[Batch],
    *,
    reference_name: str = "fp32",
    test_name: str = "int8",
    on_batch: Callable[[int], None] | None = None,
    label_output: str | None = None,
) -> CompareReport:
    """Run both models on every batch and compare their outputs (padding rows ignored); with
    labels, the accuracy of ``label_output``'s argmax (default: the first output; none for an
    output of one value a sample)."""
    if reference.output_names != test.output_names:
        raise ModelError(
            f"the models have different outputs: {reference.output_names} vs {test.output_names}",
            hint="compare an INT8 model with the FP32 model it was made from",
        )
    if not reference.output_names:
        raise ModelError(f"{reference_name} has no tensor outputs to compare (its outputs are sequences or maps)",
                         hint="quantkit compares tensor outputs; check this model's outputs with your own code")
    _check_output_shapes(reference, test, reference_name, test_name)
    per_position = set(getattr(reference, "last_axis_classes", ()))
    stats = {name: _OutputStats(name, name in per_position) for name in reference.output_names}
    correct_ref = correct_test = labelled = 0
    classes: int | None = None
    samples = 0
    first_out = label_output if label_output in reference.output_names else reference.output_names[0]
    ratios: dict[str, set[int]] = {name: set() for name in stats}  # samples per output row, each batch
    for batch, ref_out, test_out in side_by_side(reference, test, batches):
        n = batch.size
        for name, st in stats.items():
            st.update(ref_out[name], test_out[name])
            rows = int(np.shape(ref_out[name])[0]) if np.ndim(ref_out[name]) else 0
            ratios[name].add(n // rows if 0 < rows < n and n % rows == 0 else 1)
        if batch.labels is not None and ref_out[first_out].ndim == 2 and ref_out[first_out].shape[1] > 1:
            labelled += n
            classes = int(ref_out[first_out].shape[1])
            correct_ref += int((ref_out[first_out].argmax(1) == batch.labels).sum())
            correct_test += int((test_out[first_out].argmax(1) == batch.labels).sum())
        samples += n
        if on_batch is not None:
            on_batch(batch.size)
    skipped = list(getattr(batches, "skipped_", []))
    ordered = set(getattr(reference, "value_ordered", ()))
    # an embedding's argmax means nothing, nor one over a sequence's steps ([B, T]: not classes)
    embeddings = set(getattr(reference, "embeddings", ())) | set(getattr(reference, "named_axis_outputs", ()))
    few = set(getattr(reference, "regression_outputs", ()))
    parts = dict(getattr(reference, "concat_parts", {}))
    return CompareReport(
        reference_name, test_name, samples,
        [replace(s.result(s.name in ordered, top1=s.name not in embeddings, parts=parts.get(s.name, ()),
                          few_values=s.name in few),
                 rows_per=ratios[s.name].pop() if len(ratios[s.name]) == 1 else 1)
         for s in stats.values()],
        correct_ref / labelled if labelled else None,
        correct_test / labelled if labelled else None,
        skipped,
        list(getattr(reference, "non_tensor_outputs", ())),
        classes if labelled else None,
    )
