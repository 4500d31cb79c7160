"""The launch's one error type: a launch that cannot work, naming the flags, their values and the fix."""

from __future__ import annotations


class LaunchError(ValueError):
    """A launch that cannot work: names the flags, their values and the fix."""


def require(ok: bool, message: str, fix: str) -> None:
    if not ok:
        raise LaunchError(f"{message}. Fix: {fix}.")
