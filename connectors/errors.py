"""Errors every connector shares, so the pipeline can react to them without importing a concrete connector.

The service catches `FencedError` (drop the partition, another owner has it), `StateLostError` (the store
forgot the partition: claim it afresh and re-checkpoint what is in memory) and treats the other errors as
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


class StateLostError(StateStoreError):
    """The store lost the partition's state while the caller still owns it: its epoch key is gone (FLUSHALL, a
    failover to an empty replica, an eviction policy other than `noeviction`) or went back below the caller's
    epoch (it was lost and claimed afresh since). No newer owner is known, so this is not fencing: the caller
    claims a fresh epoch (`StateStore.claim(..., after=epoch)`) and re-checkpoints the state it still holds.
    `current` is the epoch found (None when the key is missing)."""

    def __init__(self, partition_id: str, epoch: int, current: int | None, action: str) -> None:
        self.partition_id, self.epoch, self.current = partition_id, epoch, current
        found = "missing" if current is None else f"{current}, below ours"
        super().__init__(
            f"{action} for partition {partition_id!r}: the store lost its state (expected owner epoch {epoch}, "
            f"the epoch key is {found}); no newer owner claimed it"
        )


class CorruptStateError(StateStoreError):
    """Stored state exists but cannot be read (a manifest that is not the expected document). The caller
    starts the partition afresh and says so; retrying would not help."""


class MissingSnapshotError(StateStoreError):
    """A blob key named by a manifest or the spill index does not exist."""

    def __init__(self, key: str, context: str = "") -> None:
        self.key = key
        super().__init__(f"expected a snapshot blob under key {key!r}, found none{context}")


class UnknownReuseError(MissingSnapshotError, ValueError):
    """`write_checkpoint(reuse=...)` named a stream with no stored blob: a caller's mistake, or state the store
    lost (a spill index or manifest evicted). A `ValueError` for the former, a `MissingSnapshotError` for the
    latter: the service treats it as lost state."""

    def __init__(self, partition_id: str, stream: str, epoch: int) -> None:
        self.key = stream
        StateStoreError.__init__(
            self, f"reuse: expected stream {stream!r} of partition {partition_id!r} to have a stored blob (spilled "
            f"in epoch {epoch} or in the previous manifest), found neither"
        )


class UnreachableError(ConnectorError):
    """A broker or store did not answer at start-up; the message names the address that was tried."""
