"""Configuration, declared once (pydantic-settings): TOML file, ``MLFABRIC_…`` environment, CLI flags.

Precedence, highest first: CLI flags, environment (``MLFABRIC_OVERLAY__STABILIZE_INTERVAL=0.5`` sets a
nested field), the TOML file given with ``--config`` (or ``MLFABRIC_CONFIG``), the chosen preset,
the defaults below. Presets (memberlist's idea): ``local`` (fast timers, one machine), ``lan``
(the defaults), ``wan`` (slow, tolerant timers).
"""

from __future__ import annotations

import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from mlfabric.errors import ConfigError


class OverlayConfig(BaseModel):
    """Chord overlay timers and sizes (Chord §4.3, §5.2)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    successors: int = Field(8, ge=1, le=64, description="Length r of the successor list (Chord §5.2: "
                            "O(log N); 8 keeps lookups correct with up to half the nodes failed at N = 256).")
    stabilize_interval: float = Field(1.0, gt=0, description="Seconds between stabilize rounds with the successor.")
    fix_fingers_interval: float = Field(0.5, gt=0, description="Seconds between finger-table refresh lookups.")
    check_predecessor_interval: float = Field(1.0, gt=0, description="Seconds between pings to the predecessor.")
    rpc_timeout: float = Field(1.0, gt=0, description="Seconds to wait for a reply before a peer is treated as unresponsive.")
    lookup_fanout: int = Field(3, ge=1, le=16, description="Closest preceding nodes returned per lookup step; "
                               "extra ones let the asker skip a dead hop.")
    lookup_retries: int = Field(2, ge=0, le=10, description="Times a lookup whose candidates all timed out "
                                "starts over from the node's own routing table before it fails.")
    max_lookup_hops: int = Field(128, ge=1, description="A lookup that needs more hops than this fails.")
    join_retry_interval: float = Field(2.0, gt=0, description="Seconds before retrying a join whose seeds all failed.")

    @model_validator(mode="after")
    def _timeout_fits(self) -> Self:
        if self.rpc_timeout > 10 * self.stabilize_interval:
            raise ValueError("overlay.rpc_timeout must be at most 10 x overlay.stabilize_interval")
        return self


class FailureConfig(BaseModel):
    """Failure detection and propagation (DESIGN.md "Failure detection and stateless propagation").

    A probe that gets no ack within ``probe_timeout`` makes the target suspect; ``indirect_checks``
    helpers then probe it for us (SWIM §4.2) and it is declared dead only when none of them reaches
    it within ``suspicion_timeout``. Worst case from crash to declaration at a near neighbour:
    ``near_interval + probe_timeout + suspicion_timeout``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: Literal["stateless", "stateful", "stabilize"] = Field(
        "stateless", description="stateless: biased keep-alives + notices to the estimated holder group; "
        "stateful: backpointers registered at each routing entry, the detector notifies them; "
        "stabilize: no propagation, every routing entry probed every near_interval.")
    near_interval: float = Field(1.0, gt=0, description="Seconds between probes of the predecessor and the "
                                 "first near_successors successors.")
    probe_predecessor: bool = Field(False, description="Also probe the predecessor at near_interval. Off by "
                                    "default: the predecessor's own predecessor detects it and its notice reaches "
                                    "us directly, so each ring link is checked once, not twice.")
    near_successors: int = Field(1, ge=1, le=64, description="Successors probed at near_interval (the rest "
                                 "of the successor list is probed at far_interval).")
    far_interval: float = Field(30.0, gt=0, description="Seconds between probes of each far routing entry "
                                "(stateless: a safety net behind propagation).")
    probe_timeout: float = Field(0.5, gt=0, description="Seconds to wait for a direct ack before asking helpers.")
    indirect_checks: int = Field(3, ge=0, le=8, description="Helpers asked to probe a suspect on our behalf.")
    suspicion_timeout: float = Field(1.0, gt=0, description="Seconds a suspect has to answer any indirect "
                                     "probe before it is declared dead.")
    notice_timeout: float = Field(0.2, gt=0, description="Seconds a forwarded failure notice waits for the next "
                                  "hop's ack before it is routed around that hop (a few round trips).")
    refresh_interval: float = Field(10.0, gt=0, description="stateful only: seconds between backpointer "
                                    "registration refreshes and backpointer-set copies to the neighbours.")
    dead_ttl: float = Field(60.0, gt=0, description="Seconds a declared death is remembered: duplicate notices "
                            "are dropped and hearsay about the dead node is ignored (direct contact clears it).")
    stall_threshold: float = Field(2.0, gt=0, description="A timer that fires this many seconds late means this "
                                   "process was stalled: its own probe timeouts are then not held against peers.")
    merge_interval: float = Field(10.0, gt=0, description="Seconds (jittered uniformly in [0.5, 1.5] x) between "
                                  "two merge probes of this node: each sends one Ping to the least recently probed "
                                  "entry of its passive list (peers it declared dead or saw leave, plus its seeds). "
                                  "A reply from a peer outside our ring starts a ring merge (Shafaat et al. 2009), so "
                                  "after a partition heals the first merge starts within about merge_interval / "
                                  "(nodes holding a live candidate); cost: one probe per node per merge_interval.")
    merge_candidates: int = Field(16, ge=0, le=1024, description="Bound of the passive list (peers declared dead or "
                                  "departed, kept as merge candidates); when full a random entry makes room. "
                                  "0 disables merge probing.")
    merge_ttl: float = Field(3600.0, gt=0, description="Seconds a dead or departed peer stays a merge candidate: a "
                             "partition that lasts longer is healed only through the configured seeds.")

    @model_validator(mode="after")
    def _timeouts_fit(self) -> Self:
        if self.probe_timeout >= self.near_interval:
            raise ValueError("failure.probe_timeout must be shorter than failure.near_interval")
        if self.far_interval < self.near_interval:
            raise ValueError("failure.far_interval must be at least failure.near_interval")
        return self


class TransportConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_frame: int = Field(1 << 20, ge=1024, le=1 << 30, description="Largest control-lane frame in bytes; "
                           "a peer announcing a larger one is disconnected.")
    send_queue_frames: int = Field(1024, ge=1, description="Frames queued per peer before new ones are dropped "
                                   "(backpressure; the protocol's timeouts recover).")
    connect_timeout: float = Field(2.0, gt=0, description="Seconds to establish a TCP connection and handshake.")
    handshake_timeout: float = Field(2.0, gt=0, description="Seconds an accepted connection may take to "
                                     "authenticate before it is dropped.")
    idle_timeout: float = Field(120.0, gt=0, description="Close a connection idle for this many seconds.")
    max_connections: int = Field(4096, ge=2, description="Open connections allowed (inbound + outbound); "
                                 "this machine allows about 20,000 files per process.")
    max_bulk_bytes: int = Field(1 << 31, ge=1, description="Largest tensor accepted on the bulk lane.")


class JobsConfig(BaseModel):
    """Timings and shapes of the training-job protocol (core/jobs.py, core/aggregate.py). Seconds.

    The defaults suit training rounds of seconds on the ``lan`` failure detector; the wait for
    children adapts per job (Jacobson: mean + 4 x deviation of past waits, within
    [``min_wait``, ``max_wait``]), so ``initial_wait`` matters for the first round only.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tree_fanout: int = Field(2, ge=1, le=16, description="Children per node in a round's ring-range tree, the "
                             "successor included: depth is about log_fanout(N), per-node messages stay constant.")
    ack_timeout: float = Field(3.0, gt=0, description="A partial or a round notice not acknowledged by then "
                               "goes to the next ancestor (partial) or is sent again (notice).")
    initial_wait: float = Field(10.0, gt=0, description="First-round wait for the children's partials, before "
                                "any observation.")
    min_wait: float = Field(0.05, gt=0, description="Lower bound of the adaptive wait for children.")
    max_wait: float = Field(120.0, gt=0, description="Upper bound of the adaptive wait, and the longest the root "
                            "holds a round open for members that keep answering 'still training'.")
    hop_allowance: float = Field(0.25, ge=0, description="Extra wait per tree level above the leaves, so a parent "
                                 "outwaits its children.")
    repair_timeout: float = Field(2.0, gt=0, description="How long the root waits for one round of gap repair.")
    repair_rounds: int = Field(3, ge=0, le=100, description="Gap repairs before the root finalises with what it has.")
    result_timeout: float = Field(15.0, gt=0, description="A member that has waited this long for the next round "
                                  "notice after contributing asks its ancestors for it.")
    takeover_delay: float = Field(1.0, ge=0, description="After the coordinator is gone, how long the new owner "
                                  "of the job key waits before it re-checks ownership and takes over.")
    resume_settle: float = Field(3.0, ge=0, description="After a restart, how long the owner of a running job's "
                                 "key stays joined before it resumes the job (the others rejoin meanwhile).")
    record_spans_max: int = Field(64, ge=0, le=4096, description="History entries keep the contributor intervals "
                                  "of a round when there are at most this many; beyond, only their count "
                                  "(the entry says so).")

    @model_validator(mode="after")
    def _waits_fit(self) -> Self:
        if self.min_wait > self.max_wait:
            raise ValueError("jobs.min_wait must not exceed jobs.max_wait")
        if self.initial_wait > self.max_wait:
            raise ValueError("jobs.initial_wait must not exceed jobs.max_wait")
        return self


class Settings(BaseSettings):
    """Everything a node needs. Every field can be set in TOML, environment or on the command line."""

    model_config = SettingsConfigDict(
        env_prefix="MLFABRIC_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    listen: str = Field("127.0.0.1:7700", description="host:port the node listens on; port 0 picks a free port.")
    advertise: str | None = Field(None, description="host:port other nodes use to reach this one "
                                  "(defaults to listen, with the real port when listen's port is 0).")
    seeds: list[str] = Field(default_factory=list, description="Addresses of nodes already in the ring; "
                             "empty creates a new ring.")
    data_dir: Path = Field(Path("./mlfabric-data"), description="Holds the node key (identity) and state.")
    control: str = Field("127.0.0.1:0", description="host:port of the local JSON control endpoint "
                         "(port 0 picks a free one; the chosen address is written to data_dir/control).")
    cluster_key: str | None = Field(None, min_length=1, description="Shared secret; when set every connection "
                                    "starts with a mutual HMAC-SHA256 challenge-response.")
    cluster_key_file: Path | None = Field(None, description="File holding the cluster key (first line).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text or JSON objects.")
    tasks: list[str] = Field(default_factory=lambda: ["digits", "mlfabric.learn.probe:IndexTask"],
                             description="Training tasks this node agrees to run: 'digits' or "
                             "'package.module:attr'. A task is code the node imports when a job names it, and "
                             "any node in the ring can submit a job: list only code you trust.")
    preload_torch: bool = Field(False, description="Import torch at start, before joining the ring (training "
                                "nodes): importing it when the first job arrives costs seconds of CPU that delay "
                                "the node's answers to failure probes.")
    torch_threads: int = Field(1, ge=1, le=1024, description="Intra-op threads torch may use for training "
                               "(torch.set_num_threads). One by default: the event loop needs the other cores' "
                               "time slices, and several daemons often share a machine; raise it on a big server.")
    overlay: OverlayConfig = Field(default_factory=OverlayConfig, description="Chord overlay timers and sizes.")
    failure: FailureConfig = Field(default_factory=FailureConfig, description="Failure detection and propagation.")
    transport: TransportConfig = Field(default_factory=TransportConfig, description="TCP lanes and their limits.")
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="Training-job protocol timings and shapes.")

    @field_validator("listen", "control")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parse_address(value, allow_zero=True)
        return value

    @field_validator("advertise")
    @classmethod
    def _check_advertise(cls, value: str | None) -> str | None:
        if value is not None:
            parse_address(value)
        return value

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, value: list[str]) -> list[str]:
        for seed in value:
            parse_address(seed)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first; pydantic-settings deep-merges nested sections across sources.
        return init_settings, env_settings, _LayerSource(settings_cls)

    def key_bytes(self) -> bytes | None:
        if self.cluster_key is not None:
            return self.cluster_key.encode()
        if self.cluster_key_file is not None:
            try:
                text = self.cluster_key_file.read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"cannot read cluster_key_file {self.cluster_key_file}: {exc.strerror}") from None
            if not text or not text[0].strip():
                raise ConfigError(f"cluster_key_file {self.cluster_key_file} is empty")
            return text[0].strip().encode()
        return None


_LAYER: ContextVar[dict[str, Any] | None] = ContextVar("mlfabric_config_layer", default=None)


class _LayerSource(PydanticBaseSettingsSource):
    """The preset merged with the TOML file: below the environment and the CLI."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _LAYER.get() or {}


PRESETS: dict[str, dict[str, Any]] = {
    "local": {
        "overlay": {
            "stabilize_interval": 0.1,
            "fix_fingers_interval": 0.05,
            "check_predecessor_interval": 0.2,
            "rpc_timeout": 0.5,
            "join_retry_interval": 0.5,
        },
        "failure": {
            "near_interval": 0.3,
            "probe_timeout": 0.25,
            "suspicion_timeout": 0.5,
            "far_interval": 3.0,
            "notice_timeout": 0.15,
            "refresh_interval": 2.0,
            "dead_ttl": 5.0,
            "merge_interval": 1.0,
            "merge_ttl": 300.0,
        },
        "transport": {"connect_timeout": 1.0, "handshake_timeout": 1.0},
    },
    "lan": {},
    "wan": {
        "overlay": {
            "stabilize_interval": 3.0,
            "fix_fingers_interval": 2.0,
            "check_predecessor_interval": 3.0,
            "rpc_timeout": 5.0,
            "join_retry_interval": 10.0,
        },
        "failure": {
            "near_interval": 3.0,
            "probe_timeout": 2.0,
            "suspicion_timeout": 4.0,
            "far_interval": 60.0,
            "notice_timeout": 1.0,
            "refresh_interval": 30.0,
            "dead_ttl": 180.0,
            "stall_threshold": 6.0,
            "merge_interval": 30.0,
        },
        "transport": {"connect_timeout": 10.0, "handshake_timeout": 10.0},
    },
}


def parse_address(text: str, allow_zero: bool = False) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too). Raises ValueError with a readable message."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise ValueError(f"address {text!r} must be host:port")
    number = int(port)
    if not (0 if allow_zero else 1) <= number <= 65535:
        raise ValueError(f"address {text!r} has port out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, number


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(
    config_file: Path | str | None = None, preset: str | None = None, **overrides: Any
) -> Settings:
    """Build Settings from preset < file < environment < overrides. Raises ConfigError (one line)."""
    preset = preset or os.environ.get("MLFABRIC_PRESET") or "lan"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    layered: dict[str, Any] = dict(PRESETS[preset])
    config_file = config_file or os.environ.get("MLFABRIC_CONFIG")
    if config_file:
        path = Path(config_file)
        try:
            layered = _merge(layered, tomllib.loads(path.read_text()))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    token = _LAYER.set(layered)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    finally:
        _LAYER.reset(token)


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid configuration: " + "; ".join(parts)
