"""When ``pdserve up`` restarts a child that exited without being asked to (torch-free, clock
passed in, so the policy is tested exactly).

A child that exits is started again after an exponential backoff: ``backoff_initial_s`` for the
first restart in the window, doubling with each further one up to ``backoff_max_s``. More than
``max_restarts`` restarts within ``window_s`` seconds means the child cannot stay up (a bad flag, a
broken device, a port taken for good): ``pdserve up`` then gives up and stops everything rather
than spinning.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # per child within window_s; one more exit and `up` gives up
    window_s: float = 300.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts: must be >= 0, got {self.max_restarts}")
        if self.window_s <= 0:
            raise ValueError(f"restart_window_s: must be > 0, got {self.window_s}")
        if not 0 <= self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError(
                f"backoff: need 0 <= initial ({self.backoff_initial_s}) <= max ({self.backoff_max_s})"
            )


@dataclass
class RestartTracker:
    """One child's recent restarts under a policy."""

    policy: RestartPolicy
    _restarts: deque[float] = field(default_factory=deque)  # monotonic times of restarts in the window

    def on_exit(self, now: float) -> float | None:
        """The child exited at ``now``: seconds to wait before starting it again, or None to give up."""
        while self._restarts and now - self._restarts[0] > self.policy.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.policy.max_restarts:
            return None
        delay = min(self.policy.backoff_max_s, self.policy.backoff_initial_s * 2 ** len(self._restarts))
        self._restarts.append(now + delay)
        return delay

    @property
    def num_recent(self) -> int:
        return len(self._restarts)
