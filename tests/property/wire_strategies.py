"""Hypothesis strategies for wire messages, derived from each field's wire kind.

A message class added later is covered automatically; a new *kind* must be taught to ``for_kind``.
"""

from __future__ import annotations

import string
from typing import Any

from hypothesis import strategies as st

from mlfabric.wire import messages as m

_HOST_CHARS = string.ascii_letters + string.digits + ".-"


def addresses() -> st.SearchStrategy[str]:
    host = st.one_of(
        st.text(_HOST_CHARS, min_size=1, max_size=40),
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
    )
    return st.builds(lambda h, p: f"{h}:{p}", host, st.integers(1, 65535))


def for_kind(kind: m.Kind) -> st.SearchStrategy[Any]:
    """Values a field of this kind may hold."""
    match kind:
        case m._Address():
            return addresses()
        case m._PeerKind():
            return st.builds(m.Peer, st.integers(0, (1 << 64) - 1), addresses())
        case m._Int():
            return st.integers(kind.lo, kind.hi)
        case m._Bool():
            return st.booleans()
        case m._Float():
            return st.floats(kind.lo, kind.hi, allow_nan=False, allow_infinity=False)
        case m.Bytes(exact=int() as n):
            return st.binary(min_size=n, max_size=n)
        case m.Bytes():
            return st.binary(max_size=min(kind.max_len, 512))
        case m.Str():
            return st.text(max_size=min(kind.max_len, 64))
        case m.Optional():
            return st.none() | for_kind(kind.inner)
        case m.ListOf():
            return st.lists(for_kind(kind.inner), max_size=min(kind.max_len, 16)).map(tuple)
    raise AssertionError(f"teach for_kind about {type(kind).__name__}")


def messages_of(cls: type[m.Message]) -> st.SearchStrategy[m.Message]:
    return st.builds(cls, **{name: for_kind(kind) for name, kind in cls.KINDS})


def messages() -> st.SearchStrategy[m.Message]:
    return st.sampled_from(sorted(m.registered().items())).flatmap(lambda item: messages_of(item[1]))


# Arbitrary msgpack-representable values (what a hostile peer can put in any slot).
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)
