"""Keep a local Ray instance on the loopback interface; call ``prefer_loopback()`` before ``import ray``.

Ray takes a node's address from its network interfaces, and reads at import time whether it may do so
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``; "0" makes it take 127.0.0.1). A process that starts its own
instance (no ``RAY_ADDRESS``) sets it, so nothing of that instance listens or connects beyond this machine;
a process that joins a cluster keeps Ray's default. This module imports nothing of Ray.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def prefer_loopback(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set the switch when no cluster address is given; True when set."""
    env = os.environ if environ is None else environ
    if env.get("RAY_ADDRESS"):
        return False
    env.setdefault(LOOPBACK_ENV, "0")
    return True
