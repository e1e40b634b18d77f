"""Connection handshake with optional mutual HMAC-SHA256 challenge-response. Sans-IO.

    dialler  -> listener : Hello(node_d, nonce_d)
    listener -> dialler  : HelloAck(node_l, nonce_l, proof_l = HMAC(key, "L" | nonce_d | nonce_l))
    dialler  -> listener : AuthProof(proof_d = HMAC(key, "D" | nonce_l | nonce_d))

Each side proves the key over the other's fresh nonce, so a recorded exchange cannot be replayed and
a reflected proof fails (the role byte differs). Without a key the proofs are empty and only the
identities are exchanged. The listener accepts nothing but AuthProof until the dialler has proved
the key; the runtime drops the connection on any :class:`AuthenticationError`.
Nonces are passed in (the runtime draws them from ``secrets``).
Must not import asyncio, socket, time, threading or torch.
"""

from __future__ import annotations

import hashlib
import hmac

from mlfabric.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from mlfabric.wire.messages import NONCE_LEN, AuthProof, Hello, HelloAck, Message, Peer


def _mac(key: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(key, role + first + second, hashlib.sha256).digest()


def _check(key: bytes | None, proof: bytes, role: bytes, first: bytes, second: bytes) -> None:
    if key is None:
        if proof:
            raise AuthenticationError("peer sent a cluster-key proof but this node has no key")
        return
    if not hmac.compare_digest(proof, _mac(key, role, first, second)):
        raise AuthenticationError("wrong cluster key (HMAC proof did not verify)")


class DialerHandshake:
    """The side that opened the connection."""

    def __init__(self, me: Peer, key: bytes | None, nonce: bytes) -> None:
        if len(nonce) != NONCE_LEN:
            raise LocalProtocolError("nonce must be 32 bytes")
        self._me, self._key, self._nonce = me, key, nonce
        self.peer: Peer | None = None
        self.done = False

    def start(self) -> Hello:
        return Hello(node=self._me, nonce=self._nonce)

    def receive(self, msg: Message) -> AuthProof:
        """Handle the listener's HelloAck; return our proof. Raises on a bad or missing proof."""
        if self.done or not isinstance(msg, HelloAck):
            raise RemoteProtocolError(f"expected HelloAck, got {type(msg).__name__}")
        _check(self._key, msg.proof, b"L", self._nonce, msg.nonce)
        self.peer = msg.node
        self.done = True
        proof = b"" if self._key is None else _mac(self._key, b"D", msg.nonce, self._nonce)
        return AuthProof(proof=proof)


class ListenerHandshake:
    """The side that accepted the connection."""

    def __init__(self, me: Peer, key: bytes | None, nonce: bytes) -> None:
        if len(nonce) != NONCE_LEN:
            raise LocalProtocolError("nonce must be 32 bytes")
        self._me, self._key, self._nonce = me, key, nonce
        self._their_nonce: bytes | None = None
        self.peer: Peer | None = None
        self.done = False

    def receive(self, msg: Message) -> HelloAck | None:
        """First Hello -> our HelloAck; then AuthProof -> None and ``done``. Anything else raises."""
        if self._their_nonce is None:
            if not isinstance(msg, Hello):
                raise RemoteProtocolError(f"expected Hello, got {type(msg).__name__}")
            self._their_nonce = msg.nonce
            self.peer = msg.node
            proof = b"" if self._key is None else _mac(self._key, b"L", msg.nonce, self._nonce)
            return HelloAck(node=self._me, nonce=self._nonce, proof=proof)
        if self.done or not isinstance(msg, AuthProof):
            raise AuthenticationError(f"expected AuthProof before any other message, got {type(msg).__name__}")
        _check(self._key, msg.proof, b"D", self._nonce, self._their_nonce)
        self.done = True
        return None
