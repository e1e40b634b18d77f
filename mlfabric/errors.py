"""The error hierarchy (h11's split): our bug versus the peer's fault versus bad user config."""


class MlfabricError(Exception):
    """Root of all mlfabric errors."""


class ConfigError(MlfabricError):
    """The user's configuration is invalid; the CLI prints it on one line and exits with code 2."""


class ProtocolError(MlfabricError):
    """A protocol rule was broken."""


class LocalProtocolError(ProtocolError):
    """We (the caller) broke a protocol rule: a bug in this process, so raise."""


class RemoteProtocolError(ProtocolError):
    """A peer broke a protocol rule: drop the frame or the connection, count it, keep serving."""


class AuthenticationError(RemoteProtocolError):
    """A peer failed the cluster-key challenge-response."""
