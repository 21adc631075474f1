"""The request object's own rules: what a caller's hint may hold, and where decoding starts."""
from __future__ import annotations

import pytest

from scheduling.request import Request, SegmentHint


def test_a_hint_holds_non_negative_durations_and_result_lengths():
    assert SegmentHint(call_duration=0.0, result_tokens=0, tool="search").result_tokens == 0
    for bad in (dict(call_duration=-1.0), dict(call_duration="1"), dict(result_tokens=-1), dict(result_tokens=1.5),
                dict(tool=3)):
        with pytest.raises(ValueError):
            SegmentHint(**bad)


def test_decoding_starts_after_the_prompt_unless_told_otherwise():
    assert Request("r", [5, 6, 7], None, 0.0).text_offsets == (3, 3)
    assert Request("r", [5, 6, 7], None, 0.0, text_offsets=(1, 2)).text_offsets == (1, 2)
