"""tail's line writer: every byte of every batch reaches stdout in order, in whole-line chunks of at most PIPE_BUF
bytes (pieces only for a longer line), one encode per batch, and a stream without a descriptor gets one write and
one flush per batch, not one per line."""

from __future__ import annotations

import io
import os
import random
import threading

import pytest

from etwmon import formats, tail
from etwmon.records import ItemType

LOST = int(ItemType.RecordsLost)
pytestmark = pytest.mark.skipif(not hasattr(os, "pipe") or os.name != "posix", reason="pipes and poll")


def _batches(seed: int) -> list[tuple[list[str], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(60):
        lines, kinds = [], []
        for _ in range(rng.randint(1, 25)):
            n = rng.choice([0, 1, 60, 700, tail._PIPE_BUF - 2, tail._PIPE_BUF - 1, tail._PIPE_BUF, 9000])
            body = "".join(rng.choice("x\u00e9\u202e\U0001f600") if rng.random() < 0.05 else "x" for _ in range(n))
            lines.append(body + "\n")
            kinds.append(rng.choice([int(ItemType.ProcessExec), int(ItemType.ProcessExit), LOST]))
        out.append((lines, kinds))
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_every_line_reaches_a_slow_pipe_whole_and_counted(seed: int, monkeypatch) -> None:
    r, w = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)  # one page: the writer waits for the reader often
    except (ImportError, AttributeError, OSError):
        pass
    chunks: list[bytes] = []
    real_write = os.write

    def write(fd: int, data) -> int:
        n = real_write(fd, data)
        chunks.append(bytes(data[:n]))
        return n

    monkeypatch.setattr(tail.os, "write", write)
    out = os.fdopen(w, "w", encoding="utf-8")
    writer = tail._LineWriter(out, tail.StopSignals())
    got = bytearray()
    rng = random.Random(seed)

    def drain() -> None:
        while True:
            data = os.read(r, rng.choice([1, 13, 500, 5000]))
            if not data:
                return
            got.extend(data)

    reader = threading.Thread(target=drain)
    reader.start()
    expected, events = [], 0
    try:
        for lines, kinds in _batches(seed):
            writer.add_lines(lines, kinds)
            assert writer.unwritten == sum(kind != LOST for kind in kinds)
            assert writer.flush()
            assert writer.unwritten == 0
            expected += lines
            events += sum(kind != LOST for kind in kinds)
    finally:
        out.close()
        reader.join()
        os.close(r)
    assert bytes(got) == "".join(expected).encode("utf-8")
    assert writer.shown == events
    # Each chunk: whole lines of at most PIPE_BUF bytes, or a PIPE_BUF-or-less piece of one longer line.
    ends = set()
    position = 0
    for line in expected:
        position += len(line.encode("utf-8"))
        ends.add(position)
    position = 0
    for chunk in chunks:
        assert 0 < len(chunk) <= tail._PIPE_BUF
        position += len(chunk)
        if b"\n" in chunk[:-1]:  # more than one line in it: whole lines only
            assert position in ends and chunk.endswith(b"\n")


def test_a_stream_gets_one_write_and_one_flush_per_batch() -> None:
    class Counting(io.StringIO):
        writes = flushes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

        def flush(self) -> None:
            self.flushes += 1

        def fileno(self) -> int:
            raise io.UnsupportedOperation("no descriptor")

    out = Counting()
    writer = tail._LineWriter(out, tail.StopSignals())
    flushes_before = out.flushes  # (asking for the descriptor flushes once)
    for lines, kinds in _batches(3)[:5]:
        writer.add_lines(lines, kinds)
        assert writer.flush()
    assert out.writes == 5 and out.flushes - flushes_before == 5
    assert out.getvalue() == "".join("".join(lines) for lines, _ in _batches(3)[:5])
    assert writer.shown == sum(kind != LOST for _, kinds in _batches(3)[:5] for kind in kinds)


def test_a_stop_signal_holds_a_streams_batch_back_and_counts_it() -> None:
    signals = tail.StopSignals()
    out = io.StringIO()
    writer = tail._LineWriter(out, signals)
    writer.add_lines(["a\n", "b\n", "lost\n"], [int(ItemType.ProcessExec), int(ItemType.ProcessExit), LOST])
    signals.count = 1  # a stop signal came: the running loop writes no more
    assert not writer.flush()
    assert out.getvalue() == "" and writer.unwritten == 2
    assert writer.flush(stopping=True)  # the final drain writes it
    assert out.getvalue() == "a\nb\nlost\n" and writer.shown == 2 and writer.unwritten == 0


class _Storm:
    """A Reader in a storm: each read finds a few new records (the ones that came while the last batch was
    written), until ``batches`` reads have found some; then the source ends."""

    lossy = False

    def __init__(self, batches: int, per_read: int) -> None:
        from types import SimpleNamespace

        from etwmon.records import encode_process_exit

        self.left = batches
        self.record = encode_process_exit(133_000_000_000_000_000, 7, 0)
        self.per_read = per_read
        self.reads = 0
        self._r, self._w = os.pipe()
        os.write(self._w, b"x")  # always readable, as a Monitor's descriptor is while records wait
        self.stats = SimpleNamespace(read=0, lost=0, dropped=0, items=0, pushed=0, bytes=0, max_items=1,
                                     max_bytes=1, parse_errors=0, source="storm", source_stats={})

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.left = 0

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass

    def wait(self, timeout=None) -> bool:
        return self.left > 0

    def readinto(self, buffer) -> int:
        if self.left <= 0:
            return 0
        self.left -= 1
        self.reads += 1
        data = self.record * self.per_read
        buffer[:len(data)] = data
        self.stats.read += self.per_read
        return len(data)

    def readable(self) -> bool:
        return self.left > 0

    def fileno(self) -> int:
        return self._r

    @property
    def running(self) -> bool:
        return self.left > 0

    def describe(self) -> str:
        return "storm"


@pytest.mark.parametrize("form", [None, "json"])
def test_a_part_batch_is_followed_by_the_batch_wait_not_an_immediate_read(form, monkeypatch) -> None:
    # In a storm a few records always came while the last batch was written: reading them at once would make every
    # batch tiny. After a part batch tail waits (and lets the records behind gather for batch_wait).
    slept: list[float] = []
    monkeypatch.setattr(tail, "_sleep", slept.append)
    reader = _Storm(batches=6, per_read=3)
    out, err = io.StringIO(), io.StringIO()
    options = tail.TailOptions(render=formats.json_line, batch_wait=0.01, batch_form=form)
    assert tail.tail(reader, options, out, err) == 0
    assert reader.reads == 6 and len(out.getvalue().splitlines()) == 18
    assert slept == [0.01] * 5  # between every two batches (the last read ends the source)
    assert "18 shown" in err.getvalue()


def test_a_full_buffer_is_read_on_without_waiting(monkeypatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(tail, "_sleep", slept.append)
    reader = _Storm(batches=4, per_read=tail.READ_SIZE // 24)  # 24-byte exits: the buffer about full each time
    out, err = io.StringIO(), io.StringIO()
    options = tail.TailOptions(render=formats.json_line, batch_wait=0.01, batch_form="json")
    assert tail.tail(reader, options, out, err) == 0
    assert reader.reads == 4 and slept == []
