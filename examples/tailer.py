"""SysMonClient in Python: drain an etwmon Monitor into a 64 KiB buffer and print every record, as the book's
client does (Windows Kernel Programming, ch. 9), local time first.

    python examples/tailer.py [--source auto|netlink|procfs|...]      # Ctrl-C to stop
"""

import argparse
import os
import signal
import sys
import warnings

from etwmon import Error, ItemType, Monitor, parse
from etwmon.formats import escape_text  # command lines are attacker-controlled: never print them raw
from etwmon.records import EXIT_CODE_UNKNOWN
from etwmon.sources import SOURCES


def display(event) -> str:
    """One record as the book's DisplayInfo prints it."""
    # Records carry a FILETIME in UTC; the book shows local time with milliseconds.
    when = event.time.astimezone().strftime("%H:%M:%S.%f")[:-3]
    match event.type:
        case ItemType.ProcessCreate:
            text = f"Process {event.pid} Created. Command line: {escape_text(event.command_line)}"
        case ItemType.ProcessExec:  # Linux only: the same pid now runs a new program
            text = f"Process {event.pid} Exec. Command line: {escape_text(event.command_line)}"
        case ItemType.ProcessExit:
            text = f"Process {event.pid} Exited (Code: {exit_code(event.exit_code)})"
        case ItemType.ThreadCreate:
            text = f"Thread {event.tid} Created in process {event.pid}"
        case ItemType.ThreadExit:
            text = f"Thread {event.tid} Exited from process {event.pid} (Code: {exit_code(event.exit_code)})"
        case ItemType.ImageLoad:
            text = (f"Image loaded into process {event.pid} at address 0x{event.load_address:x} "
                    f"({escape_text(event.image_name)})")
        case ItemType.RecordsLost:  # the ring was full or the kernel overran: say so, loudly
            text = f"WARNING: {event.count} records lost"
        case _:  # a record type newer than this client: skipped by its Size, as a C client would
            text = f"Unknown record type {getattr(event, 'item_type', event.type)}"
    return f"{when}: {text}"


def exit_code(code: int) -> str:
    # Sources that cannot know the exit code (procfs polling) say so with EXIT_CODE_UNKNOWN.
    return "unknown" if code == EXIT_CODE_UNKNOWN else str(code)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library warning (e.g. "auto" fell back to polling /proc) as one line, without Python's source excerpt."""
    print(f"tailer: warning: {message}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="auto", choices=["auto", *SOURCES])
    args = parser.parse_args()
    # SIGTERM ends the client the way Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    warnings.showwarning = show_warning

    buffer = bytearray(1 << 16)  # the book's client reads into a 64 KiB buffer; any record fits
    records = lost = 0
    try:
        with Monitor(source=args.source) as mon:  # opens the source; its thread fills a bounded ring
            print(f"watching processes and threads (source: {mon.source.name}); Ctrl-C to stop",
                  file=sys.stderr, flush=True)
            while True:
                # Sleep until the source has pushed something, instead of the book's Sleep(200) poll.
                if not mon.wait() and not mon.running:
                    break  # the source ended
                size = mon.readinto(buffer)  # whole records only; 0 when the ring is empty
                for event in parse(memoryview(buffer)[:size]):
                    if event.type == ItemType.RecordsLost:  # counted before it is shown: Ctrl-C may come between
                        lost += event.count
                    else:
                        records += 1
                    print(display(event))
                sys.stdout.flush()  # show each batch at once, even through a pipe
    except Error as exc:  # no such source here, no privilege, or the source failed: etwmon says why
        print(f"tailer: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `tailer.py | head`: the reader left; point stdout at /dev/null and end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    print(f"{records} records, {lost} lost", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
