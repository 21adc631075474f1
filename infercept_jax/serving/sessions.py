"""The requests paused at a tool call, found again by the tokens of the next turn's prompt.

An agent's next turn re-sends the conversation: the same messages, the assistant's tool call and
the tool results. Its rendered prompt then begins with every token the paused request holds, and
the rest is the result to resume it with. Keying by tokens, not by connection or session id, means
a client that reconnects (or a load balancer that moves it) still resumes, as long as the turn
reaches the server that holds the request; elsewhere it is simply a new request.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PausedTurn:
    request_id: str
    token_ids: tuple[int, ...]     # the context the request holds: prompt, outputs, earlier results
    num_generated_tokens: int      # sampled so far, over all turns (SamplingParams.max_tokens counts them)
    deadline: float                # aborted when no turn resumes it by then


class PausedTurns:
    """Paused requests waiting for their next turn. Owned by the server's event loop (no locks)."""

    def __init__(self):
        self._turns: dict[str, PausedTurn] = {}

    def __len__(self) -> int:
        return len(self._turns)

    def add(self, turn: PausedTurn) -> None:
        self._turns[turn.request_id] = turn

    def take(self, prompt_ids: list[int]) -> PausedTurn | None:
        """Remove and return the paused turn with the longest context that `prompt_ids` extends
        (by at least one token: the result); None if there is none."""
        best = None
        for turn in self._turns.values():
            n = len(turn.token_ids)
            if n < len(prompt_ids) and (best is None or n > len(best.token_ids)) \
                    and tuple(prompt_ids[:n]) == turn.token_ids:
                best = turn
        if best is not None:
            del self._turns[best.request_id]
        return best

    def expired(self, now: float) -> list[PausedTurn]:
        """Remove and return the turns whose deadline has passed."""
        gone = [turn for turn in self._turns.values() if turn.deadline <= now]
        for turn in gone:
            del self._turns[turn.request_id]
        return gone

    def remove_all(self) -> list[PausedTurn]:
        turns = list(self._turns.values())
        self._turns.clear()
        return turns
