"""One ksup per consumer identity on a host (edge): two ksup of one group with the same
``--instance-id-prefix`` would give their workers the same ``group.instance.id``s, and the broker
would fence one copy's members. On one host that is refused at start, before any worker exists.

The claim is an abstract Unix socket (Linux) named after a hash of the bootstrap servers, the
group and the prefix: host-wide (any user), gone with the process however it ends (no stale
lock files), nothing on disk. Across hosts nothing local can see the clash; there the fenced
side's workers exit FENCED and ksup halts with ExitCode.FENCED (policy.halt_for_worker_exit).
``KSUP_IDENTITY_SCOPE`` salts the name: tests set it to act as a second host.
"""

from __future__ import annotations

import hashlib
import os
import socket


class IdentityClash(Exception):
    pass


def claim_name(bootstrap: str, group: str, prefix: str) -> str:
    servers = ",".join(sorted(s.strip().lower() for s in bootstrap.split(",") if s.strip()))
    scope = os.environ.get("KSUP_IDENTITY_SCOPE", "")
    digest = hashlib.sha256(f"{servers}\n{group}\n{prefix}\n{scope}".encode()).hexdigest()[:40]
    return f"ksup-identity-{digest}"


def claim(bootstrap: str, group: str, prefix: str) -> socket.socket:
    """Hold the identity for the life of this process (keep the returned socket), or raise
    IdentityClash with the one-line reason."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.set_inheritable(False)
    try:
        sock.bind("\0" + claim_name(bootstrap, group, prefix))
    except OSError:
        sock.close()
        raise IdentityClash(
            f"another ksup on this host already consumes group {group!r} from {bootstrap} with "
            f"--instance-id-prefix {prefix!r}: their workers would share group.instance.ids and fence "
            f"each other; give each ksup its own --instance-id-prefix") from None
    return sock
