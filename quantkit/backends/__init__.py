"""Execution backends behind one small interface (Runner)."""

from quantkit.backends.base import Runner, check_feed

__all__ = ["Runner", "check_feed"]
