"""Numbers as people read them."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """1234567 -> '1.23 MB': decimal units, as every ckptstore message and listing shows them."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} PB"


def format_ranks(ranks: list[int]) -> str:
    """[0, 1, 2] -> '0-2', [0, 2] -> '0, 2', [3] -> '3': ranks in a message."""
    if len(ranks) > 1 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks))
