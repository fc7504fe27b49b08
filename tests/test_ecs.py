"""The ECS form (``etwmon.formats.event_to_ecs``, ``tail --format ecs``): field names as docs/fleet.md maps them."""

from __future__ import annotations

import json
import socket

from etwmon import records as R
from etwmon.formats import ECS_VERSION, RENDERERS, ecs_line, event_to_ecs, host_renderer

from .helpers import Watch, etwmon_argv, linux_only, new_tag, spawn

T = R.datetime_to_filetime(R.filetime_to_datetime(134_000_000_000_000_000))


def test_process_create_and_exec():
    doc = event_to_ecs(R.ProcessCreate(T, 10, 1, 1, 2, "/bin/sh -c 'echo hi there'"), host="web-01")
    assert doc["@timestamp"].endswith("Z") and doc["ecs"] == {"version": ECS_VERSION}
    assert doc["event"]["category"] == ["process"] and doc["event"]["type"] == ["start"]
    assert doc["event"]["action"] == "process-create" and doc["event"]["kind"] == "event"
    assert doc["process"]["pid"] == 10 and doc["process"]["parent"]["pid"] == 1
    assert doc["process"]["command_line"] == "/bin/sh -c 'echo hi there'"
    assert doc["process"]["args"] == ["/bin/sh", "-c", "echo hi there"] and doc["process"]["args_count"] == 3
    assert doc["host"] == {"name": "web-01"}
    assert event_to_ecs(R.ProcessExec(T, 10, 1, 1, 2, "/bin/true"))["event"]["action"] == "process-exec"
    assert "host" not in event_to_ecs(R.ProcessExec(T, 10, 1, 1, 2, "/bin/true"))


def test_exits_threads_images_and_losses():
    exit_ = event_to_ecs(R.ProcessExit(T, 10, 137))
    assert exit_["event"]["type"] == ["end"] and exit_["process"] == {"pid": 10, "exit_code": 137}
    assert "exit_code" not in event_to_ecs(R.ProcessExit(T, 10, R.EXIT_CODE_UNKNOWN))["process"]
    thread = event_to_ecs(R.ThreadCreate(T, 11, 10))
    assert thread["process"] == {"pid": 10, "thread": {"id": 11}} and thread["event"]["action"] == "thread-create"
    texit = event_to_ecs(R.ThreadExit(T, 11, 10, 3))
    assert texit["process"]["thread"]["id"] == 11 and texit["etwmon"]["thread_exit_code"] == 3
    assert texit["event"]["type"] == ["end"]
    image = event_to_ecs(R.ImageLoad(T, 10, 4096, 0x7FF000000000, "C:\\Windows\\System32\\ntdll.dll"))
    assert image["event"]["category"] == ["library"]
    assert image["dll"] == {"path": "C:\\Windows\\System32\\ntdll.dll", "name": "ntdll.dll"}
    assert image["etwmon"]["load_address"] == "0x7ff000000000"
    lost = event_to_ecs(R.RecordsLost(T, 42))
    assert lost["etwmon"]["records_lost"] == 42 and lost["event"]["action"] == "records-lost"


def test_text_that_is_not_utf8_keeps_its_bytes():
    line = R.command_line_from_argv([b"/bin/echo", b"caf\xe9"])
    doc = event_to_ecs(R.ProcessCreate(T, 10, 1, 1, 2, line))
    assert "\ufffd" in doc["process"]["command_line"]
    assert "command_line_base64" in doc["etwmon"]
    assert doc["process"]["args"][1] == "caf\ufffd"


def test_lines_are_ascii_json_and_renderers_tag_the_host():
    event = R.ProcessCreate(T, 10, 1, 1, 2, "/bin/echo \x1b]0;x\x07 \u202e")
    line = ecs_line(event)
    assert line.isascii() and "\n" not in line and json.loads(line)["process"]["pid"] == 10
    assert RENDERERS["ecs"] is ecs_line
    hosts = iter(["a", "b"])
    render = host_renderer("json", lambda: next(hosts))
    assert json.loads(render(event))["host"] == "a" and json.loads(render(event))["host"] == "b"
    assert json.loads(host_renderer("ecs", lambda: "h")(event))["host"]["name"] == "h"
    assert host_renderer("text", lambda: "h1")(event).startswith("h1 ")
    assert "\x1b" not in host_renderer("text", lambda: "h1")(event)


def test_identity_fields_when_present():
    class Enriched(R.ProcessCreate):  # what the identity stage adds, by name
        process_guid = "{6f1d2c3b-0000-0000-0000-000000000001}"
        parent_process_guid = None
        user = "root"
        uid = 0

    doc = event_to_ecs(Enriched(T, 10, 1, 1, 2, "/bin/true"))
    assert doc["process"]["entity_id"] == "{6f1d2c3b-0000-0000-0000-000000000001}"
    assert "entity_id" not in doc["process"]["parent"]
    assert doc["user"] == {"name": "root", "id": "0"}


@linux_only
def test_tail_format_ecs_locally_names_this_host():
    with Watch(etwmon_argv("tail", "--source", "procfs", "--format", "ecs")) as watch:
        watch.ready()
        tag = new_tag()
        spawn(tag)
        doc = json.loads(watch.wait_out(lambda line: tag.encode() in line, what="the ECS document"))
        assert watch.stop() == 0
    assert doc["host"]["name"] == socket.gethostname()
    assert doc["event"]["category"] == ["process"] and tag in doc["process"]["command_line"]
