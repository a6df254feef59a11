"""Reading a decoder's structure off its checkpoint keys."""

from __future__ import annotations

import re


def count_indexed(keys, prefix: str) -> int:
    """How many numbered children `prefix` has, from keys `prefix.N.…`: 1 + the largest N. Raises a
    KeyError naming `prefix.N` when there is none."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    if not found:
        raise KeyError(f"{prefix}.N")
    return 1 + max(found)
