"""Tests of dxl inside serving frameworks (optional extras: skipped when not installed)."""

from __future__ import annotations

import importlib.metadata


def pytest_report_header() -> str:
    try:
        return f"vllm {importlib.metadata.version('vllm')} (tests/integrations)"
    except importlib.metadata.PackageNotFoundError:
        return "vllm not installed: tests/integrations are skipped (make test-vllm runs them)"
