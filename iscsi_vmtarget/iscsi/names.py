"""iSCSI names: the one normal form every comparison uses (RFC 7143 §4.2.7, RFC 3722).

RFC 7143 §4.2.7.2 makes iSCSI names case-insensitive by running them through the
stringprep profile of RFC 3722 before use; two names are the same node exactly when
their normal forms are equal byte for byte. :func:`normalize_name` is that profile:

1. map (RFC 3722 §3, RFC 3454 tables B.1 and B.2): characters "commonly mapped to
   nothing" (soft hyphen, zero-width space, ...) are dropped, the rest case-folded;
2. normalize to Unicode form KC (RFC 3722 §4);
3. refuse what §6 prohibits: spaces (C.1), control characters (C.2), private use,
   non-characters, surrogates and the other tables C.3-C.9, the ideographic full stop
   U+3002 (§6.1), every ASCII character but letters, digits, ``-``, ``.`` and ``:``
   (§6.2), unassigned code points (§5, table A.1) and right-to-left characters (§7:
   a name starts with a left-to-right type designator, so RFC 3454 §6 cannot hold);
4. check the type designator (RFC 7143 §4.2.7.3-§4.2.7.6): ``iqn.`` followed by
   something, ``eui.`` + 16 hex digits, ``naa.`` + 16 or 32 hex digits; and the
   length, at most 223 bytes of UTF-8 (§4.2.7.1).

So ``IQN.2026-11.ORG.EXAMPLE:HOST`` *is* ``iqn.2026-11.org.example:host`` (and sees
exactly its LUNs), while ``" iqn.x"``, ``"iqn.x\\t"`` or ``iqn.x_y`` name no node at
all: login refuses them (02/00, initiator error) and the ACL model refuses to store
them. The ``iqn.`` date and naming authority are not checked: real initiators get
them right and tests use short names.
"""

from __future__ import annotations

import functools
import stringprep
import unicodedata
from collections.abc import Callable

from ..errors import IscsiVmtargetError

MAX_NAME_BYTES = 223  # RFC 7143 §4.2.7.1
_ALLOWED_ASCII = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.:")  # RFC 3722 §6.2
_HEX = frozenset("0123456789abcdef")
#: RFC 3722 §6: the stringprep tables an iSCSI name must not use, with what they are.
_PROHIBITED: tuple[tuple[Callable[[str], bool], str], ...] = (
    (stringprep.in_table_c11, "a space"),
    (stringprep.in_table_c12, "a space"),
    (stringprep.in_table_c21, "a control character"),
    (stringprep.in_table_c22, "a control character"),
    (stringprep.in_table_c3, "a private-use character"),
    (stringprep.in_table_c4, "a non-character code point"),
    (stringprep.in_table_c5, "a surrogate"),
    (stringprep.in_table_c6, "a character inappropriate for plain text"),
    (stringprep.in_table_c7, "a character inappropriate for canonical representation"),
    (stringprep.in_table_c8, "a display-changing character"),
    (stringprep.in_table_c9, "a tagging character"),
    (stringprep.in_table_a1, "an unassigned code point"),
    (stringprep.in_table_d1, "a right-to-left character"),
    (lambda c: c == "\u3002", "an ideographic full stop"),
    (lambda c: c < "\x80" and c not in _ALLOWED_ASCII, "a character iSCSI names exclude"),
)


class IscsiNameError(IscsiVmtargetError, ValueError):
    """Not an iSCSI name; the message says why (which character, which rule)."""


def normalize_name(name: str) -> str:
    """The RFC 3722 normal form of ``name``; :class:`IscsiNameError` if it is none."""
    mapped = "".join(stringprep.map_table_b2(c) for c in name if not stringprep.in_table_b1(c))
    # stringprep is defined on Unicode 3.2 (RFC 3454 §1.2), as encodings.idna does it
    folded = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    for char in folded:
        for in_table, what in _PROHIBITED:
            if in_table(char):
                code = f"U+{ord(char):04X}"
                raise IscsiNameError(f"contains {what} ({code}), which RFC 3722 excludes")
    _check_form(folded)
    if len(folded.encode()) > MAX_NAME_BYTES:
        raise IscsiNameError(f"is longer than {MAX_NAME_BYTES} bytes (RFC 7143 §4.2.7.1)")
    return folded


def _check_form(name: str) -> None:
    """The type designator and what must follow it (RFC 7143 §4.2.7.3-§4.2.7.6)."""
    kind, _, rest = name.partition(".")
    if kind == "iqn" and rest:
        return
    if kind == "eui" and len(rest) == 16 and set(rest) <= _HEX:
        return
    if kind == "naa" and len(rest) in (16, 32) and set(rest) <= _HEX:
        return
    raise IscsiNameError(
        "is not iqn.<date>.<authority>[:<id>], eui.<16 hex digits> or "
        "naa.<16 or 32 hex digits> (RFC 7143 §4.2.7.3)"
    )


@functools.lru_cache(maxsize=4096)
def name_key(name: str) -> str | None:
    """The normal form to compare by, or None for a string that names no node (and so
    matches nothing). Cached: login and SendTargets compare one name with every ACL."""
    try:
        return normalize_name(name)
    except IscsiNameError:
        return None


def same_node(a: str, b: str) -> bool:
    """Whether two strings name the same iSCSI node (RFC 7143 §4.2.7.2)."""
    key = name_key(a)
    return key is not None and key == name_key(b)
