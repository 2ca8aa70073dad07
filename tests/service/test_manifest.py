"""The checkpoint documents the stores write, and the service's manifest inside them, are the typed documents."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from connectors.manifest import CheckpointDocument
from connectors.memory import MemoryStore
from connectors.redis_store import RedisStateStore
from pipeline.service.manifest import PartitionManifest


@pytest.fixture(params=["redis", "memory"])
def store(request, fake_redis):
    return RedisStateStore(fake_redis(), key_prefix="t") if request.param == "redis" else MemoryStore()


def test_every_store_writes_a_checkpoint_document_with_the_service_manifest(store):
    epoch = store.claim("in:0")
    written = store.write_checkpoint("in:0", epoch, {"s": b"blob"}, {"next_offset": 7, "topic": "in", "partition": 0})
    for doc in (written, store.read_manifest("in:0")):
        typed = CheckpointDocument.model_validate(doc)
        assert (typed.partition, typed.epoch, list(typed.snapshots)) == ("in:0", epoch, ["s"])
        assert PartitionManifest.model_validate(typed.manifest).next_offset == 7


def test_a_manifest_without_a_position_or_with_a_negative_offset_is_refused():
    with pytest.raises(ValidationError, match="next_offset"):
        PartitionManifest.model_validate({"topic": "in", "partition": 0})
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        PartitionManifest.model_validate({"next_offset": -1, "topic": "in", "partition": 0})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        CheckpointDocument.model_validate({"format": 1, "partition": "p", "epoch": 1, "seq": 0, "written_at_ms": 0,
                                           "snapshots": {}, "manifest": {}, "surprise": 1})
