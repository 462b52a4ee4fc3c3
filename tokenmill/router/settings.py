"""The router's own settings (the policy's and the rollout's live beside them), in a module
light enough for the CLI to read defaults from without importing the HTTP stack."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_VERSION = "default"  # the version group of a replica given without one


@dataclass
class RouterSettings:
    max_attempts: int = 3
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 600.0
    session_header: str = "x-session-id"
    replica_api_key: str | None = None  # sent to replicas; None: the client's Authorization goes through
    max_body_bytes: int = 4 * 1024 * 1024  # a larger request body is refused with 413 (the server's default)
