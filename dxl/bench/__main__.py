"""``python -m dxl.bench [options]`` (the same as ``dxl bench [options]``), and the ``dxl``
console script's entry point :func:`main` (``dxl bench ...``, ``dxl info``)."""

from __future__ import annotations

import sys

from .cli import bench_main, main

__all__ = ["main"]

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["bench"] or args[:1] == ["info"]:
        sys.exit(main(args))
    sys.exit(bench_main(args, prog="python -m dxl.bench"))
