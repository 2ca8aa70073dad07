"""What the service stores in a checkpoint's `manifest` (see `connectors.manifest.CheckpointDocument`).

`next_offset` is where the partition resumes: every record before it is folded into the snapshots the
checkpoint references. Extra keys are allowed so that later versions can add fields without breaking older
readers of the same checkpoint.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pipeline.service.templates import TemplateMemoryState


class PartitionManifest(BaseModel):
    """The service's part of a partition checkpoint."""

    model_config = ConfigDict(extra="allow", frozen=True)

    # Offset of the next record to process (last processed + 1).
    next_offset: int = Field(ge=0)
    topic: str = Field(min_length=1)
    partition: int = Field(ge=0)
    # Streams whose context was reset (state lost or refused) and that have not had a record since: stream ->
    # the reason, published as a `context_reset` error with that stream's next record. "*": every stream that
    # starts without stored state in this partition (the partition's history was lost).
    context_resets: dict[str, str] = Field(default_factory=dict)
    # The partition's template memory (issue 18, `pipeline.service.templates`) as of `next_offset`; absent in
    # checkpoints from before it, or with `templates.enabled: false`.
    templates: TemplateMemoryState | None = None
