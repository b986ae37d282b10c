"""Evidence that no device or NIC can have pinned this process's memory.

Moving registered memory onto a memfd (:mod:`dxl.memory.share`) is only correct for pages that
nothing holds by physical page: a GPU driver's ``cudaHostRegister``, an RDMA memory region,
io_uring's fixed buffers or a VFIO DMA mapping would keep using the old pages. User space cannot
see such a pin on a given page, but it can see the two things every such pin needs:

- the driver's user-space library or device file mapped in the process (``/proc/self/maps``):
  the CUDA, ROCm, Level Zero and Ascend runtimes, verbs/rdmacm/libfabric/UCX/NIXL, and
  ``/dev/nvidia*``, ``/dev/infiniband``, ``/dev/kfd``, ``/dev/dri``, ``/dev/davinci*``,
  ``/dev/accel``, ``/dev/vfio``;
- pinned pages the kernel accounts to the process (``VmPin`` of ``/proc/self/status``: RDMA
  memory regions, io_uring fixed buffers, VFIO).

:func:`pin_hazard` says which of them it found, or "" when neither: that is when the automatic
``dxl.ShareRegistered`` (unset, the default) moves memory. Both are read again when a shared span
is given back, because a library loaded *after* registration may have pinned the shared pages.
"""

from __future__ import annotations

import re

# Libraries and device files through which a device or NIC pins host memory. A match on the
# path's last component (libraries) or the whole path (device files).
_PINNING_LIB = re.compile(
    r"^lib(cuda|cudart|nvidia-|nvrtc|cublas|nccl|hsa-runtime|amdhip|ze_loader|ze_intel|"
    r"ascendcl|acl_|hccl|ibverbs|rdmacm|mlx[45]|efa|fabric|ucp|ucs|uct|nixl)"
)
_PINNING_DEV = re.compile(r"^/dev/(nvidia|infiniband/|kfd|dri/|davinci|accel/|vfio/)")


def pin_hazard(maps_path: str = "/proc/self/maps", status_path: str = "/proc/self/status") -> str:
    """Why a device or NIC may have pinned memory of this process, or "" if nothing says so.

    Args:
        maps_path, status_path: the process's ``maps`` and ``status`` (tests point them
            elsewhere).

    An unreadable file is a hazard too: no evidence is not evidence of no pin.
    """
    try:
        with open(status_path, encoding="ascii", errors="replace") as f:
            pinned = next((line.split()[1] for line in f if line.startswith("VmPin:")), None)
        with open(maps_path, encoding="ascii", errors="replace") as f:
            paths = {parts[5] for line in f if len(parts := line.split(maxsplit=5)) == 6}
    except OSError as exc:
        return f"cannot read the process's mappings ({exc})"
    if pinned is None:
        return f"{status_path} has no VmPin line"
    if pinned != "0":
        return f"the process has pinned pages (VmPin {pinned} kB: RDMA, io_uring or VFIO)"
    for path in sorted(paths):
        name = path.strip()
        if _PINNING_DEV.match(name) or _PINNING_LIB.match(name.rsplit("/", 1)[-1]):
            return f"{name} is mapped (a device or NIC runtime that can pin host memory)"
    return ""
