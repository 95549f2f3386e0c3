import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capsa.guest.protocol import MAX_FRAME, Decoder, ProtocolError, encode


def test_round_trip_in_arbitrary_pieces() -> None:
    frames = [({"t": "req", "id": i, "op": "x", "n": "é"}, bytes([i]) * i) for i in range(50)]
    wire = b"".join(encode(h, b) for h, b in frames)
    dec = Decoder()
    got = []
    for i in range(0, len(wire), 7):
        got += dec.feed(wire[i : i + 7])
    assert got == frames and dec.pending == 0


def test_oversized_frames_are_refused_both_ways() -> None:
    with pytest.raises(ProtocolError):
        encode({"t": "data", "id": 1}, b"x" * MAX_FRAME)
    with pytest.raises(ProtocolError, match="bad frame lengths"):
        Decoder().feed(struct.pack(">II", MAX_FRAME + 1, 2))


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        b"[1,2]",
        b'{"id": 1}',
        b'{"t": "x", "id": -1}',
        b'{"t": "x", "id": true}',
        b'{"t": 5}',
        b"\xff\xfe",
    ],
)
def test_malformed_headers_are_protocol_errors(header: bytes) -> None:
    frame = struct.pack(">II", 4 + len(header), len(header)) + header
    with pytest.raises(ProtocolError):
        Decoder().feed(frame)


def test_header_longer_than_frame_is_refused() -> None:
    with pytest.raises(ProtocolError):
        Decoder().feed(struct.pack(">II", 10, 20) + b"x" * 10)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_never_crash_or_hang(data: bytes) -> None:
    dec = Decoder()
    try:
        frames = dec.feed(data)
    except ProtocolError:
        return
    for header, body in frames:
        assert isinstance(header["t"], str) and isinstance(body, bytes)
    # Whatever is still buffered is an incomplete but so far valid frame, never more.
    assert dec.pending <= 4 + MAX_FRAME


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=8), max_size=4),
            st.binary(max_size=300),
        ),
        max_size=10,
    ),
    st.integers(min_value=1, max_value=64),
)
def test_any_frames_round_trip(frames: list[tuple[dict[str, object], bytes]], step: int) -> None:
    expected = [({**h, "t": "x", "id": 3}, b) for h, b in frames]
    wire = b"".join(encode(h, b) for h, b in expected)
    dec = Decoder()
    got = []
    for i in range(0, len(wire), step):
        got += dec.feed(wire[i : i + step])
    assert got == expected


def _read_all(wire: bytes, piece: int) -> list[tuple[dict[str, object], bytes]]:
    """Every frame a FrameReader finds in ``wire``, written to a socket ``piece`` bytes at a
    time by a thread (reads return what is there, as a port's do)."""
    import socket
    import threading

    from capsa.guest.protocol import FrameReader

    ours, theirs = socket.socketpair()

    def write() -> None:
        for i in range(0, len(wire), piece):
            theirs.sendall(wire[i : i + piece])
        theirs.close()

    writer = threading.Thread(target=write)
    writer.start()
    reader, got = FrameReader(ours.fileno()), []
    while reader.read():
        got += [(h, bytes(body)) for h, body in reader.frames()]
    writer.join()
    ours.close()
    return got


@pytest.mark.parametrize("piece", [3, 4096, 1 << 20])
def test_frame_reader_finds_frames_however_they_arrive(piece: int) -> None:
    # Large bodies: the buffer's unparsed rest must move to its front, more than once.
    frames = [
        ({"t": "data", "id": i}, bytes([i % 251]) * (i * 97_003 % MAX_FRAME // 2))
        for i in range(12)
    ]
    frames += [({"t": "end", "id": 99}, b"")]
    wire = b"".join(encode(h, b) for h, b in frames)
    assert _read_all(wire, piece) == frames


def test_frame_reader_refuses_bad_lengths() -> None:
    with pytest.raises(ProtocolError, match="bad frame lengths"):
        _read_all(struct.pack(">II", MAX_FRAME + 1, 2) + b"x" * 16, 4096)
