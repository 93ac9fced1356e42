"""How rtq waits before trying Redis again: one exponential backoff for every retry loop.

A worker's claim loop, its heartbeat (thread and helper process), the outcome it stores and a
caller's collector all keep going through a Redis restart: each retries with a delay that
starts small, doubles with each failure up to a cap, and starts small again after a success.
"""

from __future__ import annotations

__all__ = ["Backoff"]


class Backoff:
    """A delay that doubles from ``first`` up to ``cap`` while failures go on.

    Args:
        first: The delay after the first failure (seconds).
        cap: The longest delay.
        rest: The delay while nothing fails (0 for "go on at once"; a heartbeat's period).
    """

    def __init__(self, first: float, cap: float, *, rest: float = 0.0) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"backoff needs 0 < first <= cap, not first={first!r}, cap={cap!r}")
        self.first = first
        self.cap = cap
        self.rest = rest
        self.delay = rest

    @property
    def failing(self) -> bool:
        """Whether the last attempt failed."""
        return self.delay != self.rest

    def failed(self, at_least: float | None = None) -> float:
        """One more failure: returns the delay to wait before the next try (``at_least`` this long)."""
        self.delay = min(max(self.delay * 2, self.first if at_least is None else at_least), self.cap)
        return self.delay

    def succeeded(self) -> None:
        """A success: the next failure starts from ``first`` again."""
        self.delay = self.rest
