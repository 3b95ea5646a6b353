"""The importers besides Common Voice, by corpus kind (filled as importers land)."""

from __future__ import annotations

IMPORTERS: dict = {}
