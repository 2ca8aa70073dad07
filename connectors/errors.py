"""Errors every connector shares, so the pipeline can react to them without importing a concrete connector.

The service catches `FencedError` (drop the partition, another owner has it) and treats the other errors as
"do not checkpoint, let the partition be re-processed"; which class raised them (Redis, Kafka, in-memory)
does not matter to it.
"""

from __future__ import annotations

from dataclasses import dataclass


class ConnectorError(RuntimeError):
    """Base of every error a connector raises on purpose; the message says what was expected and what arrived."""


class SourceError(ConnectorError):
    """A consumer operation failed; the message says which one and what arrived."""


@dataclass(frozen=True)
class FailedSend:
    """One record the broker did not acknowledge."""

    topic: str
    key: bytes
    error: BaseException


class SinkError(ConnectorError):
    """Some sends failed (or the flush timed out); the caller must not checkpoint past these records."""

    def __init__(self, message: str, failures: list[FailedSend] | None = None, succeeded: int = 0) -> None:
        self.failures = failures or []
        self.succeeded = succeeded
        super().__init__(message)


class StateStoreError(ConnectorError):
    """The state store could not do what was asked; the previous checkpoint is intact."""


class FencedError(StateStoreError):
    """Another owner claimed the partition: the caller's epoch is stale and it must stop writing."""

    def __init__(self, partition_id: str, epoch: int, current: int | None, action: str) -> None:
        self.partition_id, self.epoch, self.current = partition_id, epoch, current
        super().__init__(
            f"{action} for partition {partition_id!r} fenced: expected owner epoch {epoch}, "
            f"but the current epoch is {current if current is not None else 'unset (never claimed)'}; "
            "another consumer owns this partition now"
        )


class CorruptStateError(StateStoreError):
    """Stored state exists but cannot be read (a manifest that is not the expected document). The caller
    starts the partition afresh and says so; retrying would not help."""


class MissingSnapshotError(StateStoreError):
    """A blob key named by a manifest or the spill index does not exist."""

    def __init__(self, key: str, context: str = "") -> None:
        self.key = key
        super().__init__(f"expected a snapshot blob under key {key!r}, found none{context}")


class UnreachableError(ConnectorError):
    """A broker or store did not answer at start-up; the message names the address that was tried."""
