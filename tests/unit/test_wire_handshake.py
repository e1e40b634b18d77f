"""wire/handshake.py: mutual HMAC challenge-response over the real codec.

The attacks are played with the real messages: a keyless or wrong-keyed peer, a reflected proof, a
proof obtained from a second connection, a replayed proof, and traffic before authentication.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest

from mlfabric.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from mlfabric.wire.codec import decode, encode
from mlfabric.wire.handshake import DialerHandshake, ListenerHandshake
from mlfabric.wire.messages import NONCE_LEN, AuthProof, Hello, HelloAck, Message, Peer, Ping

KEY = b"correct horse battery staple"
OTHER_KEY = b"incorrect horse"
DIALER = Peer(0x1111, "127.0.0.1:7001")
LISTENER = Peer(0x2222, "127.0.0.1:7002")


def nonce(tag: int) -> bytes:
    return bytes([tag]) * NONCE_LEN


def wire(msg: Message) -> Message:
    """Send through the codec, as the transport does."""
    return decode(encode(msg))


def mac(key: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    """The proof as the module docstring specifies it, computed independently."""
    return hmac.new(key, role + first + second, hashlib.sha256).digest()


def handshake(dkey: bytes | None, lkey: bytes | None) -> tuple[DialerHandshake, ListenerHandshake]:
    d = DialerHandshake(DIALER, dkey, nonce(1))
    lis = ListenerHandshake(LISTENER, lkey, nonce(2))
    ack = lis.receive(wire(d.start()))
    assert ack is not None
    proof = d.receive(wire(ack))
    assert lis.receive(wire(proof)) is None
    return d, lis


@pytest.mark.parametrize("key", [None, KEY], ids=["no-key", "key"])
def test_handshake_completes_and_learns_identities(key: bytes | None) -> None:
    d, lis = handshake(key, key)
    assert d.done and lis.done
    assert d.peer == LISTENER
    assert lis.peer == DIALER


def test_without_key_proofs_are_empty() -> None:
    d = DialerHandshake(DIALER, None, nonce(1))
    lis = ListenerHandshake(LISTENER, None, nonce(2))
    ack = lis.receive(d.start())
    assert isinstance(ack, HelloAck) and ack.proof == b""
    assert d.receive(ack) == AuthProof(proof=b"")


def test_proofs_match_the_specification() -> None:
    d = DialerHandshake(DIALER, KEY, nonce(1))
    lis = ListenerHandshake(LISTENER, KEY, nonce(2))
    hello = d.start()
    assert hello == Hello(node=DIALER, nonce=nonce(1))
    ack = lis.receive(hello)
    assert ack is not None and ack.proof == mac(KEY, b"L", nonce(1), nonce(2))
    assert d.receive(ack).proof == mac(KEY, b"D", nonce(2), nonce(1))


def test_dialer_with_key_rejects_keyless_listener() -> None:
    d = DialerHandshake(DIALER, KEY, nonce(1))
    lis = ListenerHandshake(LISTENER, None, nonce(2))
    ack = lis.receive(wire(d.start()))
    with pytest.raises(AuthenticationError):
        d.receive(wire(ack))
    assert not d.done and d.peer is None


def test_keyless_dialer_rejects_listener_with_key() -> None:
    d = DialerHandshake(DIALER, None, nonce(1))
    lis = ListenerHandshake(LISTENER, KEY, nonce(2))
    ack = lis.receive(wire(d.start()))
    with pytest.raises(AuthenticationError, match="no key"):
        d.receive(wire(ack))


def test_listener_with_key_rejects_keyless_dialer() -> None:
    lis = ListenerHandshake(LISTENER, KEY, nonce(2))
    lis.receive(wire(Hello(node=DIALER, nonce=nonce(1))))
    with pytest.raises(AuthenticationError):
        lis.receive(wire(AuthProof(proof=b"")))
    assert not lis.done


def test_keyless_listener_rejects_a_proof() -> None:
    lis = ListenerHandshake(LISTENER, None, nonce(2))
    lis.receive(wire(Hello(node=DIALER, nonce=nonce(1))))
    with pytest.raises(AuthenticationError):
        lis.receive(wire(AuthProof(proof=mac(KEY, b"D", nonce(2), nonce(1)))))


def test_wrong_key_is_caught_by_the_dialer() -> None:
    d = DialerHandshake(DIALER, KEY, nonce(1))
    lis = ListenerHandshake(LISTENER, OTHER_KEY, nonce(2))
    with pytest.raises(AuthenticationError, match="wrong cluster key"):
        d.receive(wire(lis.receive(wire(d.start()))))


def test_wrong_key_is_caught_by_the_listener() -> None:
    """A dialer with another key that ignores the listener's proof still cannot get in."""
    lis = ListenerHandshake(LISTENER, KEY, nonce(2))
    lis.receive(wire(Hello(node=DIALER, nonce=nonce(1))))
    with pytest.raises(AuthenticationError, match="wrong cluster key"):
        lis.receive(wire(AuthProof(proof=mac(OTHER_KEY, b"D", nonce(2), nonce(1)))))


@pytest.mark.parametrize("position", [0, 15, 31])
def test_tampered_proof_is_rejected(position: int) -> None:
    d = DialerHandshake(DIALER, KEY, nonce(1))
    lis = ListenerHandshake(LISTENER, KEY, nonce(2))
    ack = lis.receive(d.start())
    assert ack is not None
    flipped = bytearray(ack.proof)
    flipped[position] ^= 0x01
    with pytest.raises(AuthenticationError):
        d.receive(HelloAck(node=ack.node, nonce=ack.nonce, proof=bytes(flipped)))


def test_swapped_listener_nonce_is_rejected() -> None:
    """A man in the middle cannot change the listener's nonce: the proof covers it."""
    d = DialerHandshake(DIALER, KEY, nonce(1))
    lis = ListenerHandshake(LISTENER, KEY, nonce(2))
    ack = lis.receive(d.start())
    assert ack is not None
    with pytest.raises(AuthenticationError):
        d.receive(HelloAck(node=ack.node, nonce=nonce(3), proof=ack.proof))


def test_reflected_proof_fails() -> None:
    """A keyless attacker sends the listener's own proof back as its AuthProof."""
    lis = ListenerHandshake(LISTENER, KEY, nonce(2))
    ack = lis.receive(wire(Hello(node=DIALER, nonce=nonce(1))))
    assert ack is not None
    with pytest.raises(AuthenticationError):
        lis.receive(wire(AuthProof(proof=ack.proof)))


def _victim() -> tuple[ListenerHandshake, HelloAck]:
    """A listener that a keyless attacker has dialled with nonce(1); it answered with nonce(2)."""
    lis = ListenerHandshake(LISTENER, KEY, nonce(2))
    ack = lis.receive(wire(Hello(node=DIALER, nonce=nonce(1))))
    assert isinstance(ack, HelloAck)
    return lis, ack


def test_reflection_through_other_connections_fails() -> None:
    """The attacker needs HMAC(key, "D" | nonce_l | nonce_a). It opens more connections to listeners that
    hold the key, choosing its nonce so that they compute proofs over the same nonces, and tries each."""
    _, ack = _victim()
    oracle = [
        # the victim's nonce offered back as the attacker's nonce, on a second connection
        ListenerHandshake(LISTENER, KEY, nonce(3)).receive(wire(Hello(node=DIALER, nonce=ack.nonce))),
        # ... to a listener that (wrongly) drew the same nonce: same bytes, only the role byte differs
        ListenerHandshake(LISTENER, KEY, nonce(1)).receive(wire(Hello(node=DIALER, nonce=ack.nonce))),
        # ... and the attacker's own nonce again, on another connection
        ListenerHandshake(LISTENER, KEY, nonce(4)).receive(wire(Hello(node=DIALER, nonce=nonce(1)))),
    ]
    for stolen in oracle:
        assert isinstance(stolen, HelloAck)
        victim, _ = _victim()
        with pytest.raises(AuthenticationError):
            victim.receive(wire(AuthProof(proof=stolen.proof)))
        assert not victim.done


def test_replayed_proof_fails_against_a_fresh_nonce() -> None:
    d = DialerHandshake(DIALER, KEY, nonce(1))
    old = ListenerHandshake(LISTENER, KEY, nonce(2))
    recorded = d.receive(old.receive(d.start()))  # an eavesdropper records the whole exchange
    fresh = ListenerHandshake(LISTENER, KEY, nonce(9))
    fresh.receive(wire(Hello(node=DIALER, nonce=nonce(1))))
    with pytest.raises(AuthenticationError):
        fresh.receive(wire(recorded))


@pytest.mark.parametrize("key", [None, KEY], ids=["no-key", "key"])
@pytest.mark.parametrize(
    "early",
    [Ping(seq=1), Hello(node=DIALER, nonce=nonce(1)), HelloAck(node=DIALER, nonce=nonce(1), proof=b"")],
    ids=lambda msg: type(msg).__name__,
)
def test_any_message_before_auth_proof_is_rejected(key: bytes | None, early: Message) -> None:
    lis = ListenerHandshake(LISTENER, key, nonce(2))
    lis.receive(wire(Hello(node=DIALER, nonce=nonce(1))))
    with pytest.raises(AuthenticationError, match="AuthProof"):
        lis.receive(wire(early))
    assert not lis.done


@pytest.mark.parametrize("first", [Ping(seq=1), AuthProof(proof=b""), HelloAck(node=DIALER, nonce=nonce(1), proof=b"")])
def test_listener_wants_hello_first(first: Message) -> None:
    lis = ListenerHandshake(LISTENER, KEY, nonce(2))
    with pytest.raises(RemoteProtocolError, match="expected Hello"):
        lis.receive(wire(first))
    assert lis.peer is None


def test_listener_rejects_anything_after_completion() -> None:
    _, lis = handshake(KEY, KEY)
    with pytest.raises(RemoteProtocolError):
        lis.receive(AuthProof(proof=b""))


@pytest.mark.parametrize("msg", [Ping(seq=1), Hello(node=LISTENER, nonce=nonce(2)), AuthProof(proof=b"")])
def test_dialer_wants_hello_ack(msg: Message) -> None:
    d = DialerHandshake(DIALER, None, nonce(1))
    d.start()
    with pytest.raises(RemoteProtocolError, match="expected HelloAck"):
        d.receive(msg)


def test_dialer_rejects_a_second_hello_ack() -> None:
    d = DialerHandshake(DIALER, None, nonce(1))
    lis = ListenerHandshake(LISTENER, None, nonce(2))
    ack = lis.receive(d.start())
    assert ack is not None
    d.receive(ack)
    with pytest.raises(RemoteProtocolError):
        d.receive(ack)


def test_authentication_error_is_the_peers_fault() -> None:
    assert issubclass(AuthenticationError, RemoteProtocolError)


@pytest.mark.parametrize("bad", [b"", b"x" * (NONCE_LEN - 1), b"x" * (NONCE_LEN + 1)])
def test_bad_local_nonce_is_our_bug(bad: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        DialerHandshake(DIALER, KEY, bad)
    with pytest.raises(LocalProtocolError):
        ListenerHandshake(LISTENER, KEY, bad)
