"""The ``audit`` source (Linux, root): process execs with their exact argv, from the kernel's audit log.

One idea per module: ``source`` (``AuditSource``: the rule it installs, the read loop, joining records to
processes), ``protocol`` (the NETLINK_AUDIT requests: status, enabling, backlog, rules), ``records`` (parsing
records and assembling an exec's argv from them) and ``state`` (rule keys, the lock, restoring the machine-wide
audit state, cleaning up after a killed instance). See docs/audit.md.
"""

from .source import DEFAULT_RCVBUF, AuditSource

__all__ = ["AuditSource", "DEFAULT_RCVBUF"]
