"""The fleet consumer against hostile and odd messages: whatever bytes and headers a host publishes, the reader
counts and reports a bad message with the host it claims and goes on; every batch it hands over can be shown;
a shipper's new run is told from an old one without trusting its clock."""

from __future__ import annotations

import signal
import time
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import REQUIRE_ROOT

try:
    import nats  # noqa: F401
except ImportError:
    if REQUIRE_ROOT:
        raise
    pytest.skip("nats-py is not installed (pip install 'etwmon[nats]')", allow_module_level=True)

from etwmon import records as R  # noqa: E402
from etwmon.fleet import FleetConsumer, FleetNotice, HostBatch, subject_for  # noqa: E402
from etwmon.formats import RENDERERS  # noqa: E402

from .nats_servers import NatsServer  # noqa: E402
from .test_fleet import Collector, CounterSource, ShipperThread, _body, _headers, _publish, make_stream  # noqa: E402

SUBJECT = subject_for("h1")
YEAR_10000 = R.datetime_to_filetime(datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)) + 10_000_000


@pytest.fixture
def consumer():
    """A consumer that is never connected: its message handling, fed by hand."""
    c = FleetConsumer("nats://127.0.0.1:1")
    yield c
    c.close()


def handle(consumer: FleetConsumer, body: bytes, headers: dict, subject: str = SUBJECT) -> list:
    return consumer._handle(subject, headers, body)


def assert_every_batch_shows(items: list) -> None:
    """Each HostBatch's events render in every output form (no OverflowError, no decode error)."""
    for item in items:
        assert isinstance(item, (HostBatch, FleetNotice)), item
        if isinstance(item, HostBatch):
            assert list(R.parse(item.data)) == item.events
            for event in item.events:
                for render in RENDERERS.values():
                    render(event)


def create_with_text_field(time: int, value: bytes) -> bytes:
    """A ProcessCreate whose extension block holds an Image field of exactly ``value`` (odd lengths included)."""
    return R.with_fields(R.encode_process_create(time, 7, 1, 1, 1, "cmd"), 0, [(int(R.ExtensionTag.Image), value)])


def valid_records() -> list[bytes]:
    now = R.filetime_now()
    details = R.Details(process_guid="{00000001-0002-0003-0004-000000000005}", image="/usr/bin/x",
                        current_directory="/", uid=0, user="root", parent_command_line="sh -c x",
                        start_filetime=now - 10_000_000)
    return [R.with_details(R.encode_process_create(now, 10, 1, 1, 1, "x --y"), details),
            R.encode_process_exit(now, 10, 3), R.encode_thread_create(now, 11, 10),
            R.encode_thread_exit(now, 11, 10, 0), R.encode_records_lost(now, 2)]


# --- one hostile message: counted with its host, and the next good one still read ------------------------------


HOSTILE = [
    (create_with_text_field(R.filetime_now(), b"abc"), "an odd-length text field"),
    (R.encode_thread_create(-1, 5, 5), "a Time before 1601"),
    (R.encode_thread_create(YEAR_10000, 5, 5), "a Time past year 9999"),
    (R.encode_thread_create(2**63 - 1, 5, 5), "the largest Time"),
    (R.with_details(R.encode_process_create(R.filetime_now(), 7, 1, 1, 1, "c"),
                    R.Details(start_filetime=-(2**62))), "a start time before 1601"),
    (R.with_details(R.encode_process_exit(R.filetime_now(), 7, 0), R.Details(start_filetime=2**63 - 1)),
     "a start time past year 9999"),
]


@pytest.mark.parametrize("bad, why", HOSTILE, ids=[why for _, why in HOSTILE])
def test_a_hostile_record_is_one_malformed_notice_with_its_host_and_the_next_batch_is_read(consumer, bad, why):
    assert len(handle(consumer, _body([9]), _headers("h1", 1, 1, 1))) == 1
    first = handle(consumer, bad, _headers("h1", 2, 1, 2))
    assert [(n.host, n.kind) for n in first] == [("h1", "malformed")], why
    assert consumer.stats["h1"].malformed == 1
    good = _body(range(3))
    after = handle(consumer, good, _headers("h1", 3, 3, 5))
    batches = [item for item in after if isinstance(item, HostBatch)]
    assert len(batches) == 1 and [e.tid for e in batches[0].events if e.type == R.ItemType.ThreadCreate] == [0, 1, 2]
    assert batches[0].gap == 1  # the refused batch's record, reported as lost
    assert_every_batch_shows(after)


def test_a_lone_surrogate_in_a_text_field_is_kept_and_shown_escaped(consumer):
    items = handle(consumer, create_with_text_field(R.filetime_now(), b"\x00\xd8"), _headers("h1", 1, 1, 1))
    (batch,) = items
    assert batch.events[0].image == "\ud800"
    assert_every_batch_shows(items)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=600), count=st.integers(0, 40))
def test_fuzz_any_body_is_a_batch_or_a_notice_never_an_exception(consumer, body, count):
    seq = consumer._state["h1"].seq + 1 if "h1" in consumer._state else 1
    items = handle(consumer, body, _headers("h1", seq, count, 10_000 + seq * 100))
    assert all(n.host == "h1" for n in items if isinstance(n, FleetNotice))
    assert_every_batch_shows(items)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_valid_records_with_mutated_bytes(consumer, data):
    records = data.draw(st.lists(st.sampled_from(valid_records()), min_size=1, max_size=5))
    body = bytearray(b"".join(records))
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    seq = consumer._state["h1"].seq + 1 if "h1" in consumer._state else 1
    items = handle(consumer, bytes(body), _headers("h1", seq, len(records), 10_000 + seq * 100))
    assert all(n.host == "h1" for n in items if isinstance(n, FleetNotice))
    assert_every_batch_shows(items)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=st.dictionaries(st.sampled_from(["Etwmon-Host", "Etwmon-Boot", "Etwmon-Run", "Etwmon-Seq",
                                                "Etwmon-Count", "Etwmon-Total", "Etwmon-Source"]),
                               st.text(max_size=30), max_size=7),
       subject=st.sampled_from([SUBJECT, "etwmon.h2.events", "etwmon..events", "x", "etwmon.h1.events.x"]))
def test_fuzz_any_headers_and_subject(consumer, headers, subject):
    items = handle(consumer, _body(range(2)), headers, subject)
    assert_every_batch_shows(items)


# --- run ids: a new run is new whatever its clock says ---------------------------------------------------------------


def test_a_run_whose_id_sorts_before_the_last_one_is_a_restart_not_malformed(consumer):
    # Run ids begin with the shipper's clock in hex: a clock stepped back (or a shorter hex number) sorts lower.
    runs = ["18b2c3d4e5f60000-aaaaaaaa", "0f00000000000000-bbbbbbbb", "fff-cccccccc", "1000-dddddddd"]
    items = []
    for i, run in enumerate(runs):
        items += handle(consumer, _body(range(i * 10, i * 10 + 2)), _headers("h1", 1, 2, 2, run=run))
        items += handle(consumer, _body(range(i * 10 + 2, i * 10 + 4)), _headers("h1", 2, 2, 4, run=run))
    kinds = [n.kind for n in items if isinstance(n, FleetNotice)]
    assert kinds == ["restarted"] * 3
    tids = [e.tid for b in items if isinstance(b, HostBatch) for e in b.events if e.type == R.ItemType.ThreadCreate]
    assert tids == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33]
    assert consumer.stats["h1"].malformed == 0 and consumer.stats["h1"].restarts == 3


def test_a_batch_of_a_run_that_was_already_replaced_is_refused(consumer):
    handle(consumer, _body([1]), _headers("h1", 1, 1, 1, run="2-new"))
    handle(consumer, _body([2]), _headers("h1", 1, 1, 1, run="1-other"))
    late = handle(consumer, _body([3]), _headers("h1", 2, 1, 2, run="2-new"))
    assert [(n.kind, "2-new" in n.message) for n in late] == [("malformed", True)]


@pytest.fixture
def server(tmp_path):
    s = NatsServer(tmp_path).start()
    yield s
    s.stop(signal.SIGKILL)


def test_a_shipper_whose_clock_stepped_back_starts_a_run_the_reader_takes(server, monkeypatch):
    make_stream(server.url)
    with FleetConsumer(server.url, since="all") as consumer:
        first = ShipperThread(server.url, "h1", CounterSource(total=20, rate=0))
        col = Collector(consumer)
        col.until(lambda c: len(c.tids.get("h1", [])) >= 20)
        first.stop()
        real = time.time_ns
        monkeypatch.setattr(time, "time_ns", lambda: real() - 3600 * 10**9)  # an hour back
        second = ShipperThread(server.url, "h1", CounterSource(total=20, rate=0))
        assert second.shipper.run_id < first.shipper.run_id  # as strings: the case that broke
        col.until(lambda c: len(c.tids.get("h1", [])) >= 40)
        second.stop()
    assert [n.kind for n in col.notices] == ["restarted"]
    assert col.tids["h1"] == list(range(20)) * 2
    assert consumer.stats["h1"].malformed == 0


def test_hostile_messages_on_a_real_stream_then_a_good_one_and_a_restarted_reader_goes_past_them_again(server):
    make_stream(server.url)
    now = R.filetime_now()
    hostile = [create_with_text_field(now, b"abc"), R.encode_thread_create(-5, 1, 1),
               R.encode_thread_create(YEAR_10000, 1, 1)]
    messages = [(SUBJECT, _body(range(2)), _headers("h1", 1, 2, 2))]
    messages += [(SUBJECT, body, _headers("h1", i + 2, 1, i + 3)) for i, body in enumerate(hostile)]
    messages.append((SUBJECT, _body(range(2, 7)), _headers("h1", 5, 5, 10)))
    _publish(server.url, messages)
    for _ in range(2):  # and again after a restart: nothing sticks
        with FleetConsumer(server.url, since="all") as consumer:
            col = Collector(consumer)
            col.until(lambda c: len(c.tids.get("h1", [])) >= 7 and len(c.notices) >= 3)
            assert [(n.host, n.kind) for n in col.notices] == [("h1", "malformed")] * 3
            assert col.tids["h1"] == list(range(7)) and col.lost["h1"] == [(3, True)]
