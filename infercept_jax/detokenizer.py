"""A request's output text, kept up to date token by token, and the stop strings cut from it."""
from __future__ import annotations

from scheduling.request import Request


class Detokenizer:
    """Appends the text of each request's new tokens to its `output_text`.

    Decoding the whole output every token would make text quadratic in the output length.
    Instead, as vLLM does, the tokens decoded last time are decoded again with the new ones and
    only the difference is appended: exact at token boundaries, also for tokenizers that strip a
    leading space. A character split across byte tokens (the text ends in U+FFFD) waits for its
    last byte, unless this is the final decode.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def update(self, request: Request, final: bool = False) -> None:
        if self.tokenizer is None:
            return
        start, read = request.text_offsets
        ids = request.token_ids
        if read == len(ids):
            return
        before = self.tokenizer.decode(ids[start:read])
        after = self.tokenizer.decode(ids[start:])
        if after.endswith("\ufffd") and not final:
            return
        request.output_text += after[len(before):]
        request.text_offsets = (read, len(ids))


def truncate_at_stop(request: Request, previous_len: int) -> bool:
    """Cut the output text at the first of the request's stop strings that the text added after
    `previous_len` characters completes (keeping it if `include_stop_str_in_output`); True if one did.
    A stop is not searched for before the last tool result's end: the result is not the model's
    text, and what came before it was shown whole at the pause."""
    params = request.sampling
    text = request.output_text
    longest = max(len(s) for s in params.stop)
    search_from = max(request.call_search_from, previous_len - longest + 1)
    hits = [(text.find(s, search_from), s) for s in params.stop]
    hits = [(i, s) for i, s in hits if i >= 0]
    if not hits:
        return False
    index, stop = min(hits)
    request.output_text = text[:index + len(stop)] if params.include_stop_str_in_output else text[:index]
    return True


def partial_marker_length(text: str, markers: list[str]) -> int:
    """How many characters at the end of `text` may be the start of one of `markers` (a stop
    string, a call's start): the longest end that is a proper prefix of one. The next tokens may
    complete the marker, so a stream holds those characters back."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest
