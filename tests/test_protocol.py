# SPDX-License-Identifier: GPL-2.0-or-later
"""The pure protocol layer: encoding, decoding and the batching rule, with no sockets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from passt_repair.protocol import (
    SCM_MAX_FD,
    Batch,
    BatchQueue,
    Command,
    ProtocolError,
    batches,
    decode_command,
    encode_command,
    undo_command,
)


def test_command_values_are_the_kernels() -> None:
    # include/uapi/linux/tcp.h: TCP_REPAIR_ON 1, TCP_REPAIR_OFF 0, TCP_REPAIR_OFF_NO_WP -1
    assert (Command.ON, Command.OFF, Command.OFF_NO_WP) == (1, 0, -1)
    assert [encode_command(c) for c in Command] == [b"\x01", b"\x00", b"\xff"]


@pytest.mark.parametrize("raw", [0, 1, 255])
def test_decode_round_trip(raw: int) -> None:
    assert encode_command(decode_command(raw))[0] == raw


@given(st.integers(0, 255).filter(lambda b: b not in (0, 1, 255)))
def test_any_other_byte_is_refused(raw: int) -> None:
    with pytest.raises(ProtocolError, match="unsupported command byte"):
        decode_command(raw)


def test_seed_typo_value_two_is_refused() -> None:
    """The first man page called OFF "2"; the kernel rejects 2, and so do we."""
    with pytest.raises(ProtocolError):
        decode_command(2)
    with pytest.raises(ProtocolError):
        encode_command(2)


def test_undo_never_probes() -> None:
    assert undo_command(1) == Command.ON
    assert undo_command(0) == Command.OFF_NO_WP


@pytest.mark.parametrize("n", [0, SCM_MAX_FD + 1])
def test_batch_size_limits(n: int) -> None:
    with pytest.raises(ProtocolError):
        Batch(Command.ON, tuple(range(n)))


@given(st.lists(st.integers(0, 10**6), max_size=1000))
def test_batches_keep_order_and_limit(fds: list[int]) -> None:
    out = list(batches(Command.OFF, fds))
    assert [fd for b in out for fd in b.fds] == fds
    assert all(1 <= len(b.fds) <= SCM_MAX_FD for b in out)
    assert all(len(b.fds) == SCM_MAX_FD for b in out[:-1])


@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(list(Command))), max_size=800))
def test_queue_flushes_like_passt(ops: list[tuple[int, Command]]) -> None:
    """A batch goes out when the command changes or 253 are queued; nothing is lost or reordered."""
    queue = BatchQueue()
    sent: list[Batch] = []
    for fd, command in ops:
        due = queue.add(fd, command)
        if due is not None:
            sent.append(due)
    last = queue.take()
    if last is not None:
        sent.append(last)
    assert queue.take() is None
    assert len(queue) == 0
    assert [(fd, b.command) for b in sent for fd in b.fds] == ops
    for batch in sent[:-1]:
        assert 1 <= len(batch.fds) <= SCM_MAX_FD
    # A batch is cut short only by a command change.
    for this, following in itertools.pairwise(sent):
        assert len(this.fds) == SCM_MAX_FD or this.command != following.command


def test_queue_reports_size() -> None:
    queue = BatchQueue()
    assert queue.add(3, Command.ON) is None
    assert queue.add(4, Command.ON) is None
    assert len(queue) == 2
    due = queue.add(5, Command.OFF)
    assert due == Batch(Command.ON, (3, 4))
    assert len(queue) == 1
