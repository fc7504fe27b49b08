"""Which container a cgroup path names: the id a container runtime wrote into the cgroup's name.

A pure function of the path, applied where an event is shown or matched (never per record at capture) and
cached by the path's text. What it returns is the runtime's claim: any root process can create a cgroup called
``docker-<64 hex>.scope`` and move itself into it, so a container id proves nothing the cgroup's owner did not
choose (docs/identity.md).
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["container_id_from_cgroup", "event_container_id", "rule_container_id"]

_ID = r"([0-9a-f]{64})"
# The last path component that names a container, as the runtimes name it:
#   systemd cgroup driver: docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope, libpod-<id>.scope
#   cgroupfs driver:       /docker/<id>, /kubepods/<qos>/pod<uid>/<id>, /libpod_parent/libpod-<id>
_SCOPE = re.compile(r"(?:docker|cri-containerd|crio|libpod)-" + _ID + r"(?:\.scope)?")
_PLAIN = re.compile(_ID)
# A bare id counts only under a parent that says which runtime put it there.
_PLAIN_PARENTS = ("docker", "kubepods", "crio", "containerd", "libpod_parent", "machine.slice")


@lru_cache(maxsize=4096)
def container_id_from_cgroup(path: str | None) -> str | None:
    """The 64-hex container id named in cgroup ``path`` by Docker, containerd/CRI, CRI-O or Podman, or None.

    The deepest component that names one wins (a container nested in another's cgroup is the inner one).
    ``/system.slice/docker-<id>.scope`` → ``<id>``; ``/docker/<id>`` → ``<id>``;
    ``/kubepods/burstable/pod<uid>/<id>`` → ``<id>``; ``/user.slice`` → None."""
    if not path:
        return None
    parts = path.split("/")
    for i in range(len(parts) - 1, 0, -1):
        part = parts[i]
        if len(part) < 64:
            continue
        match = _SCOPE.fullmatch(part)
        if match:
            return match.group(1)
        if _PLAIN.fullmatch(part) and any(p.split("-", 1)[0].split(".", 1)[0] in _PLAIN_PARENTS or
                                          p.startswith("kubepods") for p in parts[1:i]):
            return part
    return None


def event_container_id(event: object) -> str | None:
    """An event's container id: the one its record carries (a source that knows it), else the one its cgroup
    path names (``container_id_from_cgroup``)."""
    known = getattr(event, "container_id", None)
    if known is not None:
        return known
    return container_id_from_cgroup(getattr(event, "cgroup", None))


def rule_container_id(event: object) -> str | None:
    """The container id as rules see it: "" when the cgroup is known and names no container (a known "none",
    so ``ContainerId is X`` is false, not undecided), None when nothing says where the process ran."""
    found = event_container_id(event)
    if found is None and getattr(event, "cgroup", None) is not None:
        return ""
    return found
