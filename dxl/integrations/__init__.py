"""Connectors of serving frameworks built on dxl (each an optional extra: importing this package
imports none of them)."""
