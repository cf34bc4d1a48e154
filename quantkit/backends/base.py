"""The runner interface every backend implements: name-based inputs and outputs."""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np

from quantkit.errors import InputError, ShapeMismatchError
from quantkit.onnx.model import TensorSpec


def check_feed(feed: dict[str, np.ndarray], specs: Sequence[TensorSpec]) -> None:
    """Raise a clear error when ``feed`` does not fit the model inputs (names, rank, static dims)."""
    names = [s.name for s in specs]
    if set(feed) != set(names):
        raise InputError(
            f"inputs given {sorted(feed)} do not match the model inputs {names}",
            hint="name the data arrays after the model inputs",
        )
    for spec in specs:
        arr = feed[spec.name]
        if arr.ndim != len(spec.shape) or any(
            isinstance(d, int) and d != a for d, a in zip(spec.shape, arr.shape)
        ):
            want = "x".join(str(d) if isinstance(d, int) else "?" for d in spec.shape)
            only_batch = arr.ndim == len(spec.shape) and all(
                not isinstance(d, int) or d == a for d, a in list(zip(spec.shape, arr.shape))[1:])
            raise ShapeMismatchError(
                f"input {spec.name!r}: batch has shape {tuple(arr.shape)}, the model expects {want}",
                hint=f"the model has a fixed batch size of {spec.shape[0]}; feed batches of that size" if only_batch
                else "check the resize/crop/layout settings of the data source",
            )


class Runner(abc.ABC):
    """Runs one model. ``infer`` checks the feed once, then delegates to ``_infer_impl``."""

    backend: str = "?"
    device: str = "?"

    @property
    @abc.abstractmethod
    def input_specs(self) -> list[TensorSpec]: ...

    @property
    @abc.abstractmethod
    def output_names(self) -> list[str]: ...

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(feed, self.input_specs)
        cast = {s.name: np.asarray(feed[s.name], dtype=s.dtype) for s in self.input_specs}
        return self._infer_impl(cast)

    @abc.abstractmethod
    def _infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None:
        """Free what the runner holds (sessions, engines, device memory)."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
