"""The server-sent events decoder, against the rules of the event-stream format."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from moa.providers.sse import ServerSentEvent, SSEDecoder


def decode(*pieces: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    return [event for piece in pieces for event in decoder.feed(piece)]


def test_one_data_line_is_one_event() -> None:
    assert decode(b'data: {"a": 1}\n\n') == [ServerSentEvent('{"a": 1}')]


def test_several_data_lines_are_joined_with_newlines() -> None:
    assert decode(b"data: first\ndata: second\ndata:\ndata: third\n\n") == [
        ServerSentEvent("first\nsecond\n\nthird")
    ]


def test_comments_and_unknown_fields_are_ignored() -> None:
    stream = b": keep-alive\n\n: another\ndata: x\nfoo: bar\n: mid-event comment\n\n"
    assert decode(stream) == [ServerSentEvent("x")]


def test_exactly_one_space_after_the_colon_is_dropped() -> None:
    assert decode(b"data:  two spaces\n\ndata:none\n\n") == [
        ServerSentEvent(" two spaces"),
        ServerSentEvent("none"),
    ]


def test_a_field_without_a_colon_has_an_empty_value() -> None:
    assert decode(b"data\ndata\n\n") == [ServerSentEvent("\n")]


def test_event_id_and_retry_fields() -> None:
    stream = b"event: update\nid: 7\nretry: 1500\ndata: x\n\ndata: y\n\n"
    assert decode(stream) == [
        ServerSentEvent("x", event="update", id="7", retry=1500),
        ServerSentEvent("y", id="7"),  # the last event id carries over; type and retry do not
    ]


def test_an_event_without_data_is_not_dispatched() -> None:
    assert decode(b"event: ping\n\nid: 3\n\n") == []


def test_crlf_and_cr_line_ends_including_a_crlf_split_across_reads() -> None:
    assert decode(b"data: a\r\n\r\ndata: b\r\rdata: c\r") == [
        ServerSentEvent("a"),
        ServerSentEvent("b"),
    ]
    assert decode(b"data: a\r", b"\n", b"\r", b"\ndata: b\n\n") == [
        ServerSentEvent("a"),
        ServerSentEvent("b"),
    ]


def test_an_event_cut_off_by_the_end_of_the_stream_is_dropped() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: whole\n\ndata: cut") == [ServerSentEvent("whole")]
    assert decoder.feed(b"") == []


def test_a_leading_byte_order_mark_is_skipped_and_utf8_split_across_reads_survives() -> None:
    text = "données ✓".encode()
    assert decode(b"\xef\xbb\xbfdata: " + text[:3], text[3:] + b"\n\n") == [
        ServerSentEvent("données ✓")
    ]


_LINES = st.sampled_from(
    [b"data: x", b"data: \xc3\xa9t\xc3\xa9", b"data", b": comment", b"event: e", b"id: 1", b""]
)
_ENDS = st.sampled_from([b"\n", b"\r\n", b"\r"])


@settings(deadline=None)  # a shared machine stalls single examples; speed is not the point
@given(
    st.lists(st.tuples(_LINES, _ENDS), max_size=30),
    st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_where_the_network_splits_the_bytes_never_changes_the_events(
    lines: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(line + end for line, end in lines)
    points = sorted({min(cut, len(stream)) for cut in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert decode(*pieces) == decode(stream)
