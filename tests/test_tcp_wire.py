# SPDX-License-Identifier: GPL-2.0-or-later
"""The state record and its encoding: pure, no sockets.

Round trips for every shape a record can take, every way a stream can be
cut or bent, and the property that `decode` accepts only what `encode`
produces: whatever bytes it accepts, encoding the result gives them back.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from passt_repair.tcp import ConnectionState, RecordError, RepairWindow, SocketOptions, TcpState, check, decode, encode
from passt_repair.tcp.state import MAX_QUEUE, MOVABLE_STATES, assemble
from passt_repair.tcp.wire import MAGIC, VERSION

U32 = st.integers(0, 0xFFFFFFFF)


def sample(**changes: object) -> ConnectionState:
    """A valid IPv4 record with every optional part present."""
    base = ConnectionState(
        local=("198.18.0.1", 8080),
        remote=("198.18.0.2", 40000),
        state=TcpState.ESTABLISHED,
        snd_seq=0xFFFFFF00,
        rcv_seq=0x80000001,
        mss=1448,
        window_scaling=True,
        snd_wscale=7,
        rcv_wscale=10,
        sack=True,
        timestamp=0xFEDCBA98,
        window=RepairWindow(snd_wl1=0x80000001, snd_wnd=65535, max_window=65535, rcv_wnd=131072, rcv_wup=0x80000001),
        sent=b"sent" * 10,
        unsent=b"unsent",
        received=b"received",
        rcv_shutdown=False,
        options=SocketOptions(
            nodelay=True,
            keepalive=True,
            keepidle=30,
            keepintvl=5,
            keepcnt=3,
            user_timeout=10000,
            congestion="reno",
            sndbuf=65536,
            rcvbuf=131072,
            tos=0x10,
            mark=0xFFFFFFFF,
            notsent_lowat=131072,
        ),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def sample6(**changes: object) -> ConnectionState:
    return sample(local=("2001:db8::1", 443), remote=("2001:db8::2:1", 50000), **changes)


@st.composite
def states(draw: st.DrawFn) -> ConnectionState:
    v6 = draw(st.booleans())
    host = st.integers(1, 254)
    if v6:
        local = f"2001:db8::{draw(host):x}"
        remote = draw(st.sampled_from([f"2001:db8:1::{draw(host):x}", f"::ffff:198.18.0.{draw(host)}"]))
    else:
        local, remote = f"198.18.0.{draw(host)}", f"198.19.0.{draw(host)}"
    state = draw(st.sampled_from(sorted(MOVABLE_STATES)))
    fin_received = state in (TcpState.CLOSE_WAIT, TcpState.LAST_ACK, TcpState.CLOSING)
    queue = st.binary(max_size=64)
    empty_send = state == TcpState.FIN_WAIT2
    received = draw(queue)
    rcv_seq = draw(U32)
    rcv_nxt = (rcv_seq + len(received)) & 0xFFFFFFFF
    back = draw(st.integers(0, 1000))
    rcv_wnd = draw(st.integers(0, 1 << 24))
    wscale = draw(st.booleans())
    return ConnectionState(
        local=(local, draw(st.integers(1, 65535))),
        remote=(remote, draw(st.integers(1, 65535))),
        state=state,
        snd_seq=draw(U32),
        rcv_seq=rcv_seq,
        mss=draw(st.integers(1, 65535)),
        window_scaling=wscale,
        snd_wscale=draw(st.integers(0, 14)) if wscale else 0,
        rcv_wscale=draw(st.integers(0, 14)) if wscale else 0,
        sack=draw(st.booleans()),
        timestamp=draw(st.none() | U32),
        window=RepairWindow(
            snd_wl1=(rcv_nxt - draw(st.integers(0, 1000))) & 0xFFFFFFFF,
            snd_wnd=(snd_wnd := draw(st.integers(0, 1 << 20))),
            max_window=snd_wnd + draw(st.integers(0, 1 << 20)),
            rcv_wnd=rcv_wnd,
            rcv_wup=(rcv_nxt - back) & 0xFFFFFFFF,
        ),
        sent=b"" if empty_send else draw(queue),
        unsent=b"" if empty_send else draw(queue),
        received=received,
        rcv_shutdown=fin_received or draw(st.booleans()),
        options=SocketOptions(
            nodelay=draw(st.booleans()),
            keepalive=draw(st.booleans()),
            keepidle=draw(st.integers(1, 32767)),
            keepintvl=draw(st.integers(1, 32767)),
            keepcnt=draw(st.integers(1, 127)),
            user_timeout=draw(st.integers(0, 0x7FFFFFFF)),
            congestion=draw(st.sampled_from(["", "reno", "cubic", "bbr", "dctcp", "htcp_2-x"])),
            sndbuf=draw(st.none() | st.integers(1, 0x7FFFFFFF)),
            rcvbuf=draw(st.none() | st.integers(1, 0x7FFFFFFF)),
            tos=draw(st.integers(0, 255)),
            mark=draw(U32),
            notsent_lowat=draw(U32),
        ),
    )


# -- round trips --------------------------------------------------------------


@given(st.lists(states(), max_size=5))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_round_trip(records: list[ConnectionState]) -> None:
    data = encode(records)
    assert decode(data) == records
    assert decode(bytearray(data)) == records
    assert decode(memoryview(data)) == records


def test_round_trip_every_optional_part_off() -> None:
    bare = sample(
        window_scaling=False,
        snd_wscale=0,
        rcv_wscale=0,
        sack=False,
        timestamp=None,
        sent=b"",
        unsent=b"",
        received=b"",
        options=SocketOptions(),
    )
    assert decode(encode([bare, sample6(), bare])) == [bare, sample6(), bare]


def test_empty_list() -> None:
    data = encode([])
    assert data == MAGIC + struct.pack("!HHI", VERSION, 0, 0)
    assert decode(data) == []


def test_layout_starts_with_magic_version_count() -> None:
    data = encode([sample(), sample6()])
    assert data[:4] == b"PRTC"
    assert struct.unpack("!HHI", data[4:12]) == (2, 0, 2)
    (length,) = struct.unpack("!I", data[12:16])
    assert data[16] == 4  # the first record's family
    assert data[16 + length + 4] == 6  # the next record starts right after it
    # The record ends with the CRC-32 of everything before it, its length word included.
    assert struct.unpack("!I", data[12 + length : 16 + length])[0] == zlib.crc32(data[12 : 12 + length])
    assert data.endswith(bytes(sample6().received) + struct.pack("!I", zlib.crc32(data[16 + length : -4])))


# -- what decode refuses -----------------------------------------------------


def test_every_truncation_is_refused() -> None:
    data = encode([sample(), sample6()])
    for cut in range(len(data)):
        with pytest.raises(RecordError, match=r"truncated|record"):
            decode(data[:cut])


@pytest.mark.parametrize(
    ("mangle", "fragment"),
    [
        (lambda d: b"XXXX" + d[4:], "not a connection state stream"),
        (lambda d: d[:4] + struct.pack("!H", 3) + d[6:], "unsupported version 3"),
        (lambda d: d[:4] + struct.pack("!H", 1) + d[6:], "version 1 stream .no integrity check. is not read"),
        (lambda d: d[:6] + struct.pack("!H", 1) + d[8:], "reserved header field"),
        (lambda d: d[:8] + struct.pack("!I", 3) + d[12:], "announces 3 records, the stream holds 2"),
        (lambda d: d[:8] + struct.pack("!I", 1) + d[12:], "bytes after the last of 1 records"),
        (lambda d: d + b"\0", "1 bytes after the last of 2 records"),
        (lambda d: d[:8] + struct.pack("!I", 0xFFFFFFFF) + d[12:], "announces 4294967295 records"),
    ],
)
def test_bad_stream(mangle: object, fragment: str) -> None:
    data = encode([sample(), sample6()])
    with pytest.raises(RecordError, match=fragment):
        decode(mangle(data))  # type: ignore[operator]


def _record(data: bytes, index: int = 0) -> int:
    """Offset of record `index` in a stream."""
    offset = 12
    for _ in range(index):
        offset += 4 + struct.unpack_from("!I", data, offset)[0]
    return offset


def reseal(data: bytes | bytearray) -> bytes:
    """`data` with each record's CRC made right again, as far as the length words lead."""
    buf = bytearray(data)
    offset = 12
    while offset + 4 <= len(buf):
        (length,) = struct.unpack_from("!I", buf, offset)
        if length < 4 or offset + length + 4 > len(buf):
            break
        struct.pack_into("!I", buf, offset + length, zlib.crc32(buf[offset : offset + length]))
        offset += length + 4
    return bytes(buf)


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """A field changed, the CRCs recomputed: what a bug on the source, not damage on the way, would make."""
    buf = bytearray(data)
    struct.pack_into("!" + fmt, buf, offset, value)
    return reseal(buf)


# Offsets within an IPv4 record: its length word 0; after it: family 0, state 1, flags 2, local 4-9,
# remote 10-15, snd_seq 16, rcv_seq 20, mss 24, wscales 26/27, timestamp 28, window 32-51,
# keepidle 52, keepintvl 54, keepcnt 56, user_timeout 57, tos 61, mark 62, sndbuf 66, rcvbuf 70,
# notsent_lowat 74, name length 78, sent 79, unsent 83, received 87; the CRC after the queues.
@pytest.mark.parametrize(
    ("at", "fmt", "value", "fragment"),
    [
        (0, "I", 5000, "truncated: the record says 5004 bytes"),
        (0, "I", 100, "inconsistent: the record says 100 bytes"),
        (4 + 0, "B", 5, "address family 5 is neither 4 nor 6"),
        (4 + 1, "B", 10, "state LISTEN cannot be moved"),
        (4 + 1, "B", 99, "unknown TCP state 99"),
        (4 + 2, "H", 0x8000, "unknown flags 0x8000"),
        (4 + 8, "H", 0, "local port 0 is out of range"),
        (4 + 10, "I", 0, "remote address 0.0.0.0 cannot be one end"),
        (4 + 10, "I", 0xE0000001, "remote address 224.0.0.1 cannot be one end"),
        (4 + 24, "H", 0, "MSS 0 is out of range"),
        (4 + 26, "B", 15, "window scale 15/10 is out of range"),
        (4 + 36, "I", 70000, "max_window 65535 is below snd_wnd 70000"),
        (4 + 52, "H", 0, "TCP_KEEPIDLE 0 is out of range"),
        (4 + 56, "B", 200, "TCP_KEEPCNT 200 is out of range"),
        (4 + 78, "B", 3, "inconsistent"),
        (4 + 79, "I", 0xFFFFFF00, "inconsistent: the record says"),
    ],
)
def test_bad_field(at: int, fmt: str, value: int, fragment: str) -> None:
    data = encode([sample(), sample6()])
    with pytest.raises(RecordError, match=f"record 0: .*{fragment}"):
        decode(_patch(data, _record(data) + at, fmt, value))


def test_timestamp_value_without_its_flag() -> None:
    data = encode([sample(timestamp=None)])
    with pytest.raises(RecordError, match="timestamp value without the timestamps flag"):
        decode(_patch(data, 12 + 4 + 28, "I", 12345))


def test_buffer_size_without_its_flag() -> None:
    data = encode([sample(options=SocketOptions())])
    with pytest.raises(RecordError, match="buffer size without its flag"):
        decode(_patch(data, 12 + 4 + 66, "I", 4096))


def test_congestion_name_not_ascii() -> None:
    data = encode([sample()])
    name_at = data.index(b"reno")
    with pytest.raises(RecordError, match="not ASCII"):
        decode(reseal(data[:name_at] + b"r\xe9no" + data[name_at + 4 :]))
    with pytest.raises(RecordError, match="not a congestion control name"):
        decode(reseal(data[:name_at] + b"r no" + data[name_at + 4 :]))


def test_second_record_named() -> None:
    data = encode([sample(), sample6()])
    with pytest.raises(RecordError, match=r"^record 1: .*MSS 0"):
        decode(_patch(data, _record(data, 1) + 4 + 48, "H", 0))  # IPv6: addresses are 12 bytes longer each


def test_oversized_queue() -> None:
    big = sample(received=bytes(MAX_QUEUE + 1), window=RepairWindow(0x80000001, 65535, 65535, 131072, 0x80000001))
    with pytest.raises(RecordError, match="oversized"):
        check(big)
    with pytest.raises(RecordError, match="oversized"):
        encode([big])
    # Bytes made by hand: the decoder refuses them after reading the length, before any socket exists.
    ok = encode([sample(received=b"")])
    at = 12 + 4 + 87
    raw = bytearray(ok[:-4] + bytes(MAX_QUEUE + 1) + bytes(4))
    struct.pack_into("!I", raw, at, MAX_QUEUE + 1)
    struct.pack_into("!I", raw, 12, struct.unpack_from("!I", ok, 12)[0] + MAX_QUEUE + 1)
    with pytest.raises(RecordError, match="oversized"):
        decode(reseal(raw))


@given(st.data())
@settings(max_examples=300)
def test_decode_accepts_only_what_encode_makes(data: st.DataObject) -> None:
    """Random damage to a valid stream: refused with RecordError, or (rarely) another valid stream exactly."""
    original = bytearray(encode([sample(), sample6(state=TcpState.CLOSE_WAIT, rcv_shutdown=True)]))
    for _ in range(data.draw(st.integers(1, 4))):
        original[data.draw(st.integers(0, len(original) - 1))] = data.draw(st.integers(0, 255))
    try:
        decoded = decode(bytes(original))
    except RecordError as e:
        message = str(e)
    else:
        assert encode(decoded) == bytes(original)
        return
    assert message
    assert "\n" not in message


# -- integrity ---------------------------------------------------------------


def test_every_single_bit_flip_is_refused() -> None:
    """Each of the stream's bits flipped in turn, queues included: never a record, always RecordError."""
    data = encode([sample(), sample6(state=TcpState.CLOSE_WAIT, rcv_shutdown=True), sample(sent=b"", unsent=b"")])
    assert all(len(q) for q in (sample().sent, sample().unsent, sample().received))
    decode(data)
    flipped = bytearray(data)
    for bit in range(len(data) * 8):
        flipped[bit >> 3] ^= 1 << (bit & 7)
        with pytest.raises(RecordError) as refused:
            decode(flipped)
        assert "\n" not in str(refused.value)
        flipped[bit >> 3] ^= 1 << (bit & 7)
    assert flipped == data


def test_a_flipped_queue_byte_fails_the_integrity_check() -> None:
    data = bytearray(encode([sample(), sample6()]))
    at = data.index(b"unsent")
    data[at] ^= 0x20
    with pytest.raises(RecordError, match=r"^record 0: integrity check failed: the record's CRC-32 is 0x[0-9a-f]{8}"):
        decode(data)
    second = bytearray(encode([sample(), sample6()]))
    second[-1] ^= 1  # the second record's own CRC
    with pytest.raises(RecordError, match=r"^record 1: integrity check failed"):
        decode(second)


def test_the_integrity_check_comes_before_any_value() -> None:
    """A damaged MSS reads as damage, not as an out-of-range MSS: the CRC is checked first."""
    data = encode([sample()])
    damaged = bytearray(data)
    struct.pack_into("!H", damaged, 12 + 4 + 24, 0)
    with pytest.raises(RecordError, match="integrity check failed"):
        decode(damaged)
    with pytest.raises(RecordError, match="MSS 0 is out of range"):
        decode(reseal(damaged))


# -- what check refuses (and encode, and restore, through it) ----------------


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"state": TcpState.LISTEN}, "state LISTEN cannot be moved"),
        ({"state": TcpState.TIME_WAIT}, "cannot be moved"),
        ({"state": TcpState.FIN_WAIT2}, "FIN_WAIT2 means everything sent was acknowledged"),
        ({"state": TcpState.CLOSE_WAIT}, "CLOSE_WAIT means the peer's FIN arrived, yet reading is not shut down"),
        ({"remote": ("2001:db8::2", 1)}, "remote address 2001:db8::2 is IPv6, the other end IPv4"),
        ({"remote": ("example.org", 1)}, "not an IP address"),
        ({"local": ("198.18.0.1", 65536)}, "local port 65536"),
        ({"snd_seq": 1 << 32}, "snd_seq .* is not a 32-bit"),
        ({"rcv_seq": -1}, "rcv_seq -1 is not a 32-bit"),
        ({"mss": 65536}, "MSS 65536"),
        ({"window_scaling": False}, "window scales without window scaling"),
        ({"timestamp": 1 << 32}, "timestamp .* is not a 32-bit"),
        ({"window": RepairWindow(0x80000001, 10, 10, 0, 0x80000001 + 9)}, "rcv_wup .* is after the next expected"),
        ({"window": RepairWindow(0x80000001 + 100, 10, 10, 0, 0x80000001)}, "snd_wl1 .* is beyond the receive window"),
        ({"options": SocketOptions(congestion="a" * 16)}, "not a congestion control name"),
        ({"options": SocketOptions(sndbuf=0)}, "SO_SNDBUF 0"),
        ({"options": SocketOptions(tos=256)}, "TOS/traffic class 256"),
        ({"options": SocketOptions(mark=-1)}, "SO_MARK -1"),
        ({"options": SocketOptions(keepintvl=40000)}, "TCP_KEEPINTVL 40000"),
        ({"options": SocketOptions(user_timeout=-5)}, "TCP_USER_TIMEOUT -5"),
        ({"options": SocketOptions(notsent_lowat=1 << 32)}, "TCP_NOTSENT_LOWAT 4294967296"),
    ],
)
def test_check_refuses(changes: dict[str, object], fragment: str) -> None:
    bad = sample(**changes)
    with pytest.raises(RecordError, match=fragment):
        check(bad)
    with pytest.raises(RecordError, match=rf"^record 1 \(198\.18\.0\.1:.*\): .*{fragment}"):
        encode([sample(), bad])


def test_fin_states_accept_what_they_mean() -> None:
    check(sample(state=TcpState.FIN_WAIT2, sent=b"", unsent=b""))
    check(sample(state=TcpState.LAST_ACK, rcv_shutdown=True))
    check(sample(state=TcpState.ESTABLISHED, rcv_shutdown=True))  # the application shut down reading


def test_check_remembers_only_records_that_cannot_change() -> None:
    """A record that passed is not checked again; a copy with a change is, and so is one with a growable part."""
    good = sample(state=TcpState.FIN_WAIT2, sent=b"", unsent=b"")
    check(good)
    with pytest.raises(RecordError, match="FIN_WAIT2 means"):
        check(dataclasses.replace(good, sent=b"x"))  # a new record: checked, however the old one fared
    growing = bytearray()
    sneaky = dataclasses.replace(good, sent=growing)  # type: ignore[arg-type]
    check(sneaky)
    growing += b"x"
    with pytest.raises(RecordError, match="FIN_WAIT2 means"):
        check(sneaky)
    port = ["198.18.0.2", 40000]
    listed = dataclasses.replace(good, remote=port)  # type: ignore[arg-type]
    check(listed)
    port[1] = 0
    with pytest.raises(RecordError, match="remote port 0"):
        check(listed)


def fields_of(record: object) -> set[str]:
    """The attributes a record holds, the mark `check` leaves aside."""
    return set(vars(record)) - {"_checked"}


def test_assemble_makes_what_the_constructor_makes() -> None:
    record = sample()
    fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    made = assemble(ConnectionState, dict(fields))
    assert made == record
    assert repr(made) == repr(record)
    assert hash(made.window) == hash(record.window)
    assert dataclasses.replace(made) == record


@pytest.mark.parametrize("copy", [True, False])
def test_decode_makes_whole_records(copy: bool) -> None:
    """decode builds records without their __init__: every field must be there, and nothing else."""
    for record in decode(encode([sample(), sample6(timestamp=None, options=SocketOptions())]), copy=copy):
        assert fields_of(record) == {f.name for f in dataclasses.fields(ConnectionState)}
        assert fields_of(record.window) == {f.name for f in dataclasses.fields(RepairWindow)}
        assert fields_of(record.options) == {f.name for f in dataclasses.fields(SocketOptions)}
        assert dataclasses.replace(record) == record


def test_describe_and_family() -> None:
    assert sample().describe() == "198.18.0.1:8080 -> 198.18.0.2:40000"
    assert sample6().describe() == "[2001:db8::1]:443 -> [2001:db8::2:1]:50000"
    assert sample6().family.name == "AF_INET6"
    assert sample().rcv_nxt == 0x80000001 + len(b"received")
    assert TcpState.LAST_ACK.fin_sent
    assert TcpState.LAST_ACK.fin_received
    assert not TcpState.ESTABLISHED.fin_sent
    assert not TcpState.FIN_WAIT2.fin_received
