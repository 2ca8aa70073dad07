"""The checkpoint document a `StateStore` keeps per partition, as a pydantic model.

Every store (Redis, in-memory) writes the same JSON document::

    {"format": 1, "partition": X, "epoch": E, "seq": S, "written_at_ms": T,
     "snapshots": {stream: blob_key}, "manifest": <the caller's JSON object>}

`manifest` is the caller's own document (for the service: `pipeline.service.manifest.PartitionManifest`);
the store only guarantees it is a JSON object and gives it back unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FORMAT: Literal[1] = 1


class CheckpointDocument(BaseModel):
    """A partition's last committed checkpoint: where its snapshots are and the caller's manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = MANIFEST_FORMAT
    # Partition id (`topic:partition` for the service).
    partition: str = Field(min_length=1)
    # Owner epoch that wrote it (strictly increasing per partition, see `StateStore.claim`).
    epoch: int = Field(ge=1)
    # Store-wide sequence number of the write (makes blob keys unique).
    seq: int = Field(ge=0)
    written_at_ms: int = Field(ge=0)
    # Stream key -> blob key of its snapshot.
    snapshots: dict[str, str]
    manifest: dict[str, Any]
