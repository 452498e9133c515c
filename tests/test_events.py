"""Event decoding: the three event types, and every reason a message is refused."""

from __future__ import annotations

import pytest

from stream_fm.stream.events import REASONS, BadEvent, Click, Impression, Sample, decode


def test_the_three_event_types():
    imp = decode(
        b'{"type": "impression", "id": "i1", "ts": 1764065700.5, "features": {"ad": "a17", "price": 3}}'
    )
    assert imp == Impression("i1", 1764065700.5, {"ad": "a17", "price": 3})
    assert decode(b'{"type": "click", "impression_id": "i1", "ts": 1764065712}') == Click("i1", 1764065712.0)
    assert decode(b'{"type": "sample", "label": 1, "features": {"g": ["a", "b"]}}') == Sample(
        True, {"g": ["a", "b"]}
    )
    assert decode(b'{"type": "click", "impression_id": "i1", "ts": 5, "extra": "ignored"}') == Click(
        "i1", 5.0
    )


@pytest.mark.parametrize(
    ("message", "reason", "says"),
    [
        (b"x" * 2000, "oversize", "2000 bytes"),
        (b'{"type": "click", "impression_id": "\xff\xfe", "ts": 1}', "encoding", "not UTF-8"),
        (b'{"type": "click", ', "json", ""),
        (b'{"type": "sample", "label": 1, "features": {"p": NaN}}', "json", ""),
        (b"[1, 2]", "schema", "JSON object"),
        (None, "schema", "tombstone"),
        (b'{"type": "view"}', "schema", '"type"'),
        (b'{"type": "click", "ts": 1}', "schema", "impression_id"),
        (b'{"type": "click", "impression_id": "i", "ts": "yesterday"}', "schema", '"ts"'),
        (b'{"type": "click", "impression_id": "i", "ts": -5}', "schema", '"ts"'),
        (b'{"type": "impression", "id": 7, "ts": 1, "features": {}}', "schema", '"id"'),
        (b'{"type": "impression", "id": "i", "ts": 1, "features": [1]}', "schema", '"features"'),
        (b'{"type": "sample", "label": 2, "features": {}}', "schema", "label"),
        (b'{"type": "sample", "label": 0.5, "features": {}}', "schema", "label"),
        (b'{"type": "impression", "id": "i", "ts": 1, "features": {"a": null}}', "feature", "'a'"),
        (b'{"type": "impression", "id": "i", "ts": 1, "features": {"a": {"b": 1}}}', "feature", "'a'"),
        (b'{"type": "impression", "id": "i", "ts": 1, "features": {"tags": ["x", 1]}}', "feature", "'tags'"),
        (b'{"type": "impression", "id": "i", "ts": 1, "features": {"big": 1e400}}', "json", ""),
        (b'{"type": "impression", "id": "i", "ts": 1, "features": {"big": ' + b"9" * 400 + b"}}", "json", ""),
    ],
)
def test_bad_messages_say_why(message, reason, says):
    with pytest.raises(BadEvent) as info:
        decode(message, max_bytes=1000)
    assert info.value.reason == reason and info.value.reason in REASONS
    assert says in str(info.value)
