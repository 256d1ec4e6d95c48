"""Numbers in user-facing text: "1 shard", "3 shards", "12.0 MiB"."""

from __future__ import annotations


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """``n`` and the noun, singular for exactly 1: ``plural(1, "shard") == "1 shard"``,
    ``plural(2, "process", "processes") == "2 processes"`` (default plural: noun + "s")."""
    return f"{n} {noun if n == 1 else (plural_form or noun + 's')}"


def size(n: float) -> str:
    """A byte count in binary units: "512 B", "1.5 KiB", ..., up to GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
