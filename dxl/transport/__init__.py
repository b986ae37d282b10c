"""Data-path transports behind one interface (:class:`~dxl.transport.base.Transport`).

- ``cma`` (:mod:`.cma`): same host, ``process_vm_readv/writev``, plus memcpy through memory the
  peer shares via memfds (:mod:`.shm`);
- ``tcp`` (:mod:`.tcp` client, :mod:`.tcp_server` data server): any host;
- :mod:`.select` picks and proves the transport of a new link;
- ``inprocess`` (:mod:`.inprocess`, tests): engines of one process, by memcpy, with faults
  injected; only where an engine is given its backend (``Engine(transport_backend=...)``).
"""

from .base import (
    Capabilities,
    Failure,
    Job,
    PeerGone,
    TransferTimeout,
    Transport,
    TransportClosed,
    Unreachable,
    host_identity,
)

__all__ = [
    "Capabilities",
    "Failure",
    "Job",
    "PeerGone",
    "TransferTimeout",
    "Transport",
    "TransportClosed",
    "Unreachable",
    "host_identity",
]
