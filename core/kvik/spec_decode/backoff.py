"""When a host proposer (n-gram, suffix) stops finding drafts, speculation steps aside for a while.

A step that drafts must wait for the previous step's tokens, so under async scheduling it costs
the overlap of host work with the device's step (on an H200, 8B at batch 16: 8.6 against 5.4
ms/token when n-gram found nothing to draft). After a step in which no request got drafts, the
engine runs ``skip`` steps asynchronously without proposing, doubling that stretch after each
further empty step up to ``MAX_SKIPPED_STEPS``; a step with drafts resets it. Outputs do not
change: drafts only decide how many tokens a step verifies.
"""

from __future__ import annotations

from dataclasses import dataclass

# Longest stretch without proposing: a copy that starts in the output is found at most this many
# tokens late, and a probe costs one synchronous step in MAX_SKIPPED_STEPS + 1.
MAX_SKIPPED_STEPS = 16


@dataclass
class SpecBackoff:
    idle: int = 0  # length of the current back-off (0: proposing every step)
    left: int = 0  # steps still to skip

    def skip(self) -> bool:
        """Whether this step skips proposing (and counts it)."""
        if self.left:
            self.left -= 1
            return True
        return False

    def record(self, drafted: int) -> None:
        """A step proposed and ``drafted`` requests got drafts."""
        self.idle = 0 if drafted else min(MAX_SKIPPED_STEPS, max(1, 2 * self.idle))
        self.left = self.idle
