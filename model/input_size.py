"""The input sizes the model accepts: the one rule, read by the model, the config check and the export."""

from __future__ import annotations

from collections.abc import Sequence

MULTIPLE, MINIMUM = 32, 64
RULE = (
    f"a multiple of {MULTIPLE} of at least {MINIMUM} pixels, or [height, width] of such (the "
    f"1/{MULTIPLE}-scale bottleneck needs 2x2 cells for its instance norms)"
)


def valid_input_size(size: object) -> bool:
    """Whether ``size`` (one side, or ``[height, width]``) follows :data:`RULE`."""
    if isinstance(size, int):
        sides = [size]
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        sides = list(size)
    else:
        return False
    return all(
        isinstance(s, int) and not isinstance(s, bool) and s >= MINIMUM and s % MULTIPLE == 0 for s in sides
    )


def input_hw(size: int | Sequence[int], key: str = "data.image_size") -> tuple[int, int]:
    """``size`` as ``(height, width)``; a ``ValueError`` names ``key`` and the rule if it breaks it."""
    if not valid_input_size(size):
        raise ValueError(f"{key} must be {RULE}; got {size!r}")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
