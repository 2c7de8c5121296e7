"""``outbox dispatch --until-idle``: when is the work done, and saying why we wait.

"Idle" means nothing in flight anywhere and nothing pending due within the
horizon. Messages due later (retries far ahead, quiet hours, ``send_at``) are left
for the next run, and the exit line says how many and when the first is due.
"""

from __future__ import annotations

import contextlib
import logging
import math

from outbox.dispatcher._store import Store, StoreError

log = logging.getLogger("outbox.dispatcher")

OTHERS_POLL_SECONDS = 0.05
"""How often to look again while other replicas still have messages in flight."""


class UntilIdle:
    """Decides, each time this replica has nothing to do, whether the run is over."""

    def __init__(self, store: Store, *, horizon: float) -> None:
        self._store = store
        self.horizon = horizon
        self._reason: str | None = None

    async def wait_cap(self) -> float | None:
        """None: exit now. Otherwise the longest this replica may sleep before asking
        again (infinity: only its poll interval and the next due message bound it).
        """
        try:
            due_in, sending = await self._store.next_due()
        except StoreError:
            due_in, sending = 0.0, True  # cannot tell: not idle
        if not sending and (due_in is None or due_in > self.horizon):
            await self._log_exit(due_in)
            return None
        self._log_wait(due_in, sending)
        return OTHERS_POLL_SECONDS if sending else math.inf

    def _log_wait(self, due_in: float | None, sending: bool) -> None:
        """Say what keeps the run going, once per reason (not every poll)."""
        reason = "sending" if sending else "due"
        if reason == self._reason:
            return
        self._reason = reason
        if sending:
            log.info("until-idle: waiting for messages in flight on other replicas")
        else:
            log.info(
                "until-idle: waiting for a message due in %.1fs (within --idle-horizon %gs)",
                max(0.0, due_in or 0.0),
                self.horizon,
            )

    async def _log_exit(self, due_in: float | None) -> None:
        if due_in is None:
            log.info("until-idle: nothing pending or in flight; exiting")
            return
        count, first = 0, None
        with contextlib.suppress(StoreError):
            count, first = await self._store.deferred_summary()
        log.info(
            "until-idle: idle; %d message(s) deferred beyond --idle-horizon %gs,"
            " the first due at %s; exiting",
            count,
            self.horizon,
            first.isoformat(timespec="seconds") if first is not None else f"+{due_in:.0f}s",
        )
