"""Command-line options several ``etwmon`` commands share (tail, record, serve): what they read from the kernel
besides process events — image loads (bpf only, opt-in) and the hashes of the files — and the usage error they
raise. Parsing and wiring only; the work is in etwmon.hashes and the bpf source."""

from __future__ import annotations

import argparse

__all__ = ["UsageError", "hash_algorithms", "add_capture_options", "add_identity_option", "image_load_option"]


class UsageError(Exception):
    """A bad option or environment value: one line on stderr, exit status 2."""


def hash_algorithms(text: str) -> str:
    """``--hashes``: Sysmon's algorithm names, checked (``md5,sha256``, ``*``), in Sysmon's order."""
    from .hashes import parse_algorithms

    try:
        return ",".join(parse_algorithms(text)[0])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_capture_options(command: argparse.ArgumentParser, what: str) -> None:
    """``--image-loads`` and ``--hashes`` for a command that captures for ``what`` (record, serve)."""
    command.add_argument("--image-loads", action="store_true",
                         help=f"{what} image loads too (ImageLoad: each file mapped executable, shared libraries "
                              "and LD_PRELOAD included; bpf source only, off by default: nothing watches mmap)")
    command.add_argument("--hashes", type=hash_algorithms, metavar="ALGS",
                         help="the hashes of each process record's executable (and each image load's file), "
                              "Sysmon's form: md5, sha1, sha256 comma-separated, or * (default: the --config "
                              "file's <HashAlgorithms>, else none; docs/identity.md)")
    add_identity_option(command)


def add_identity_option(command: argparse.ArgumentParser) -> None:
    """``--full-identity``: every process record self-contained (``Monitor(identity="full")``, docs/identity.md);
    sets ``identity`` to "full" (True without it; ``tail --no-identity`` sets it to False)."""
    command.add_argument("--full-identity", dest="identity", action="store_const", const="full", default=True,
                         help="add the user name and the parent's command line and user to every process record "
                              "(Monitor(identity='full'): more CPU per event; by default the bpf source's records "
                              "carry the uid and the parent's guid and image, and the process table the rest)")


def image_load_option(args: argparse.Namespace) -> dict:
    """``{"image_loads": True}`` when ``--image-loads`` or ``--type`` (image, image_load, all) asks for image loads
    (off otherwise: nothing watches mmap); a source other than bpf (or auto) is then a usage error."""
    from .records import ItemType

    types = getattr(args, "types", None)
    if not (getattr(args, "image_loads", False) or (types and ItemType.ImageLoad in frozenset().union(*types))):
        return {}
    if args.source not in ("auto", "bpf"):
        raise UsageError(f"image loads come from the bpf source only; the {args.source} source does not see them "
                         "(use --source bpf, as root)")
    return {"image_loads": True}
