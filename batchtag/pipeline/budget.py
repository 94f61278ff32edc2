"""``--max-requests N``: a run stops cleanly after N requests, as a user caps what a run may
spend. Every attempt (first tries, retries, probes, on every endpoint) takes one request
from the run's one budget just before it is sent; an item whose request the budget refuses
gets no record, so a rerun does it like any item a stop left undone."""

from __future__ import annotations


class RequestLimitReached(Exception):
    """The run's request budget is spent: the sender stops instead of sending."""


class RequestBudget:
    """How many requests the run may still send (None: no limit). Used from the event loop
    only, so a plain counter is enough."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.spent = 0

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.spent >= self.limit

    def spend(self) -> None:
        """Take one request, or raise RequestLimitReached when none is left."""
        if self.exhausted:
            raise RequestLimitReached(self.limit)
        self.spent += 1
