"""Values from users' files, as error messages show them: bounded.

A config, a data row or a selection file can hold a value of any size or depth (a million-item
list, a 5000-digit integer, a YAML alias bomb), and an error message that shows it whole can take
longer to build than the run, or run out of memory. Every message that shows such a value goes
through `quote` (or `cut`, for text shown as it is).
"""

from __future__ import annotations

import reprlib

MESSAGE_VALUE_CHARS = 200  # the most a message shows of one value
_MAX_INT_BITS = 256  # larger integers are shown by size: repr refuses those over 4300 digits


class _BoundedRepr(reprlib.Repr):
    """reprlib's repr, whose work is bounded by the items and levels it shows, with integers too
    large to print shown by their size."""

    def __init__(self):
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = self.maxset = self.maxfrozenset = \
            self.maxdeque = 8
        self.maxstring = self.maxlong = self.maxother = MESSAGE_VALUE_CHARS

    def repr_int(self, x, level):
        if x.bit_length() > _MAX_INT_BITS:
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_REPR = _BoundedRepr()


def cut(text: str) -> str:
    """``text`` itself when short, else its start and ``...``."""
    return text if len(text) <= MESSAGE_VALUE_CHARS else text[:MESSAGE_VALUE_CHARS - 3] + "..."


def quote(value) -> str:
    """``repr(value)`` for a message, at most `MESSAGE_VALUE_CHARS` characters, in time and memory
    bounded whatever the value."""
    return cut(_REPR.repr(value))
