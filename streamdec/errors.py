"""streamdec's errors, and the one rule that turns any exception into the one line a user reads.

Every refusal streamdec makes on purpose is a `StreamdecError` (a ValueError): its message names the
problem and the fix on one line. Exceptions from the libraries underneath (torch, PyAV, safetensors)
are quoted through `one_line`, which the loaders, the sinks and the command line all use.
"""

from __future__ import annotations


class StreamdecError(ValueError):
    """Input or settings streamdec refuses; the message says what is wrong and what to do."""


def one_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, its white space folded; for an OSError
    its reason ("No space left on device"), not the errno tuple; the type's name if it says nothing."""
    text = str(err)
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror
    for line in text.splitlines():
        if line.strip():
            return " ".join(line.split())
    return type(err).__name__
