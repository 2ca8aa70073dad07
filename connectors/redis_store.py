"""Per-partition checkpoints in Redis with zombie fencing (`StateStore` + `SnapshotStore`).

Layout, for key prefix `P` and partition id `X` (the `{X}` hash tag keeps a partition on one cluster slot):

    P:epoch:{X}                       INCR counter; the current owner's epoch
    P:seq:{X}                         INCR counter; makes every blob key unique
    P:manifest:{X}                    JSON document of the last committed checkpoint
    P:refs:{X}                        SET of blob keys the manifest references
    P:spilled:{X}                     HASH stream -> blob key of sessions spilled in the current epoch
    P:snap:{X}:<stream>:<epoch>:<seq> checkpoint blob (written once, never overwritten)
    P:spill:{X}:<stream>:<epoch>:<seq> spilled-session blob

A blob is a Redis LIST of parts of at most `BLOB_PART_BYTES` (2 MiB), written by pipelined RPUSHes and
read back with one LRANGE. One 47 MB SET costs Redis with an append-only file about 300 ms on the 2-core
test machine, the same bytes as 2 MiB parts about 55 ms (`sinkstream bench service` reports the cost).

Epochs only increase, so a missing epoch key (FLUSHALL, a failover to an empty replica, an eviction policy
other than `noeviction`) or one below the caller's is state the store lost, not a newer owner: those writes
raise `StateLostError` (the caller re-claims with `claim(after=epoch)`), a higher epoch raises `FencedError`.

A checkpoint writes its blobs under fresh keys with a TTL (`pending_ttl_s`), so a writer that dies half-way
leaves only expiring garbage. One Lua script then, atomically: checks that the caller's epoch is still the
current one (else `FencedError`, nothing changes), checks every referenced blob exists, removes the TTLs,
switches the manifest, and unlinks the blobs only the previous manifest referenced, and the spill index
entries (and blobs) of streams the new manifest does not name (a checkpoint covers every stream the caller
still knows, a spilled one by reuse; one it left out was dropped, e.g. a closed session). Readers therefore
see either the old checkpoint or the new one, never a mix.

Manifests are JSON (never pickle). The stored document is::

    {"format": 1, "partition": X, "epoch": E, "seq": S, "written_at_ms": T,
     "snapshots": {stream: blob_key}, "manifest": <the caller's dict>}

Concurrency: one writer per partition and epoch (the pipeline's owner of that partition). Two threads
writing the same partition under the same epoch get `StateStoreError` instead of a lost update.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

import redis
import structlog
from pydantic import ValidationError

from connectors.errors import (
    CorruptStateError,
    FencedError,
    MissingSnapshotError,
    StateLostError,
    StateStoreError,
    UnknownReuseError,
)
from connectors.manifest import CheckpointDocument

log = structlog.get_logger(__name__)

MANIFEST_FORMAT = 1
MAX_BLOB_BYTES = 512 * 1024 * 1024  # sanity bound on one stream's snapshot
BLOB_PART_BYTES = 2 * 1024 * 1024  # one RPUSH per part: Redis' append-only file handles huge values badly
_PIPELINE_BYTES = 64 * 1024 * 1024  # flush a write pipeline once this many blob bytes are queued



# KEYS: epoch, spilled, refs.  ARGV: after (the new epoch must exceed it).  Returns {new_epoch, dropped_spill_blobs}.
_CLAIM_LUA = """
local e = redis.call('INCR', KEYS[1])
if e <= tonumber(ARGV[1]) then e = tonumber(ARGV[1]) + 1; redis.call('SET', KEYS[1], e) end
local dropped = 0
for _, k in ipairs(redis.call('HVALS', KEYS[2])) do
  if redis.call('SISMEMBER', KEYS[3], k) == 0 then redis.call('UNLINK', k); dropped = dropped + 1 end
end
redis.call('DEL', KEYS[2])
return {e, dropped}
"""

# KEYS: epoch, manifest, refs, spilled.  ARGV: epoch, had_old ('1'/'0'), old_raw, new_doc, n_refs,
# <n_refs blob keys>, <streams written fresh>.  Returns {'ok', gc} | {'fenced', cur} | {'conflict'} |
# {'missing', key}.
_COMMIT_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur ~= ARGV[1] then return {'fenced', cur or ''} end
local old = redis.call('GET', KEYS[2])
if ARGV[2] == '1' then
  if old ~= ARGV[3] then return {'conflict'} end
elseif old then return {'conflict'} end
local n = tonumber(ARGV[5])
local new = {}
for i = 1, n do
  local k = ARGV[5 + i]
  if redis.call('EXISTS', k) == 0 then return {'missing', k} end
  new[k] = true
end
for i = 1, n do redis.call('PERSIST', ARGV[5 + i]) end
for i = 6 + n, #ARGV do
  local sk = redis.call('HGET', KEYS[4], ARGV[i])
  if sk then
    redis.call('HDEL', KEYS[4], ARGV[i])
    if not new[sk] then redis.call('UNLINK', sk) end
  end
end
local gc = 0
local streams = cjson.decode(ARGV[4])['snapshots']
local index = redis.call('HGETALL', KEYS[4])
for i = 1, #index, 2 do
  if streams[index[i]] == nil then
    redis.call('HDEL', KEYS[4], index[i])
    if not new[index[i + 1]] then redis.call('UNLINK', index[i + 1]); gc = gc + 1 end
  end
end
local spilled = {}
for _, v in ipairs(redis.call('HVALS', KEYS[4])) do spilled[v] = true end
for _, k in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if not new[k] and not spilled[k] then redis.call('UNLINK', k); gc = gc + 1 end
end
redis.call('DEL', KEYS[3])
for i = 1, n do redis.call('SADD', KEYS[3], ARGV[5 + i]) end
redis.call('SET', KEYS[2], ARGV[4])
return {'ok', gc}
"""

# KEYS: epoch, spilled, refs.  ARGV: epoch, stream, blob key.  Returns {'ok'} | {'fenced', cur} | {'missing', key}.
_SPILL_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur ~= ARGV[1] then return {'fenced', cur or ''} end
if redis.call('EXISTS', ARGV[3]) == 0 then return {'missing', ARGV[3]} end
redis.call('PERSIST', ARGV[3])
local old = redis.call('HGET', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
if old and old ~= ARGV[3] and redis.call('SISMEMBER', KEYS[3], old) == 0 then redis.call('UNLINK', old) end
return {'ok'}
"""


def connect_redis(
    url: str, *, password: str | None = None, socket_timeout_s: float = 10.0, ssl_ca_certs: str | None = None
) -> redis.Redis:
    """A `redis.Redis` for `url` (`redis://host:port/db`, `rediss://` for TLS) with `password` and a socket timeout.

    The password is given apart from the URL so it never ends up in a log line; a password inside the URL
    still wins, as redis-py does. `ssl_ca_certs` is the CA bundle that signs the server's certificate
    (`rediss://` only; None uses the system's). Use `redacted_address(url)` to log where the client points.
    """
    if not url:
        raise ValueError(
            "expected a Redis URL ('redis://host:port/db'), got an empty one; set redis.url or start the "
            "embedded stack (`sinkstream stack up`)"
        )
    if socket_timeout_s <= 0:
        raise ValueError(f"expected socket_timeout_s > 0, got {socket_timeout_s}")
    options: dict[str, Any] = {"socket_timeout": socket_timeout_s, "socket_connect_timeout": socket_timeout_s}
    if password is not None:
        options["password"] = password
    if ssl_ca_certs:
        if not url.startswith("rediss://"):
            raise ValueError(f"ssl_ca_certs is set, so expected a rediss:// URL, got {redacted_address(url)} over plain redis://")
        options["ssl_ca_certs"] = ssl_ca_certs
    return redis.Redis.from_url(url, **options)


def redacted_address(url: str) -> str:
    """`host:port` of a Redis URL, for logs: the URL itself may carry a password (`redis://:pw@host`)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        return f"{parts.hostname or '?'}:{parts.port or 6379}"
    except ValueError:
        return "<unparsable redis url>"


_F = TypeVar("_F", bound=Callable[..., Any])

# RPUSH the first part of a blob and give the key its pending TTL in one atomic step, so that a writer that
# dies at any point leaves only keys that expire. KEYS: blob key. ARGV: first part, ttl ms.
_START_BLOB_LUA = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


def _store_errors(method: _F) -> _F:
    """Report Redis' own failures (connection refused, timeout, loading, read-only replica...) as
    `StateStoreError`, the connectors' shared error: the service reacts to it without importing redis."""

    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except redis.RedisError as exc:
            raise StateStoreError(
                f"{method.__name__}: Redis did not answer as expected: {type(exc).__name__}: {exc}"
            ) from exc

    return wrapped  # type: ignore[return-value]


def _fence_error(partition_id: str, epoch: int, current: int | None, action: str) -> StateStoreError:
    """A newer epoch is fencing (`FencedError`); a missing epoch key, or one below ours, is state the store lost
    (`StateLostError`): epochs only ever increase, so nobody newer holds the partition."""
    if current is None or current < epoch:
        return StateLostError(partition_id, epoch, current, action)
    return FencedError(partition_id, epoch, current, action)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisStateStore:
    """`StateStore` and `SnapshotStore` on a `redis.Redis` client (see the module docstring for the layout).

    Args:
        client: a connected `redis.Redis` (its `decode_responses` must be False: blobs are bytes).
        key_prefix: prefix of every key.
        pace_s: sleep between two blob writes of one checkpoint, so other clients get Redis' attention
            0 pipelines the writes.
        pending_ttl_s: lifetime of blobs written but not yet referenced by a committed manifest or spill
            index; it bounds the garbage a crashed writer leaves and must exceed a checkpoint's duration
            (the pacing time is added automatically).
    """

    def __init__(
        self, client: redis.Redis, key_prefix: str = "sinkstream", *, pace_s: float = 0.0, pending_ttl_s: float = 3600.0
    ) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisStateStore needs a client with decode_responses=False (blobs are bytes), got True")
        if pace_s < 0 or pending_ttl_s <= 0:
            raise ValueError(f"expected pace_s >= 0 and pending_ttl_s > 0, got {pace_s} and {pending_ttl_s}")
        self._r = client
        self._prefix = key_prefix
        self._pace_s = pace_s
        self._pending_ttl_s = pending_ttl_s
        self._claim = client.register_script(_CLAIM_LUA)
        self._commit = client.register_script(_COMMIT_LUA)
        self._spill = client.register_script(_SPILL_LUA)
        self._start_blob = client.register_script(_START_BLOB_LUA)


    def ping(self) -> None:
        """Raise `redis.RedisError` when Redis does not answer (used before the service starts)."""
        self._r.ping()

    # ---- keys ------------------------------------------------------------------------------------------
    def _key(self, kind: str, partition_id: str) -> str:
        if not partition_id or "{" in partition_id or "}" in partition_id:
            raise ValueError(f"expected a non-empty partition id without braces, got {partition_id!r}")
        return f"{self._prefix}:{kind}:{{{partition_id}}}"

    def _blob_key(self, kind: str, partition_id: str, stream_key: str, epoch: int, seq: int) -> str:
        return f"{self._key(kind, partition_id)}:{stream_key}:{epoch}:{seq}"

    # ---- StateStore --------------------------------------------------------------------------------------
    @_store_errors
    def claim(self, partition_id: str, *, after: int = 0) -> int:
        """Increment and return the partition's owner epoch, at least `after + 1` (a re-claim after the epoch key
        was lost keeps epochs increasing); drop the previous owner's spilled sessions."""
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ValueError(f"expected after to be an epoch int >= 0, got {after!r}")
        epoch, dropped = self._claim(
            keys=[self._key(kind, partition_id) for kind in ("epoch", "spilled", "refs")], args=[after],
        )
        log.info("state.claimed", partition=partition_id, epoch=int(epoch), dropped_spills=int(dropped))
        return int(epoch)

    def current_epoch(self, partition_id: str) -> int | None:
        """The partition's current owner epoch, None when it was never claimed."""
        raw = self._r.get(self._key("epoch", partition_id))
        return None if raw is None else int(raw)

    @_store_errors
    def read_manifest(self, partition_id: str) -> dict[str, Any] | None:
        """The last committed manifest document (see module docstring), or None before the first checkpoint."""
        key = self._key("manifest", partition_id)
        raw = self._r.get(key)
        return None if raw is None else self._parse_manifest(key, raw)

    @_store_errors
    def write_checkpoint(
        self,
        partition_id: str,
        epoch: int,
        snapshots: Mapping[str, bytes] | Iterable[tuple[str, bytes]],
        manifest: Mapping[str, Any],
        *,
        reuse: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Write `snapshots` under new keys, then switch the manifest if `epoch` is still current.

        `snapshots` is a mapping or an iterable of `(stream, blob)` pairs; an iterable is consumed one blob at a
        time (each is written and dropped before the next is asked for), so a caller that serializes lazily
        never holds more than one blob plus the bounded write pipeline. `reuse` names streams whose blob is
        carried over unchanged: the stream's spilled blob of this epoch if there is one, else the blob the
        previous manifest references. Streams neither in `snapshots` nor in `reuse` are not part of the new
        checkpoint (their old blobs are garbage-collected). A previous manifest that cannot be parsed is
        replaced (nothing of it is reused). Returns the stored manifest document. Raises `FencedError`,
        `StateStoreError`, `ValueError`.
        """
        reuse = list(reuse)
        if isinstance(snapshots, Mapping) and set(reuse) & set(snapshots):
            both = sorted(set(reuse) & set(snapshots))
            raise ValueError(f"streams {both} are both in snapshots and in reuse; expected each in at most one")
        try:
            user_manifest = json.loads(json.dumps(dict(manifest), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"manifest must be JSON-serializable (no NaN/inf, str keys); got: {exc}") from exc
        keys = [self._key(k, partition_id) for k in ("epoch", "manifest", "refs", "spilled")]
        self._ensure_epoch(partition_id, epoch, "checkpoint")
        old_raw = self._r.get(keys[1])
        try:
            old_doc = self._parse_manifest(keys[1], old_raw) if old_raw is not None else None
        except CorruptStateError as exc:
            log.warning("state.manifest_replaced", partition=partition_id, error=str(exc))
            old_doc = None
        refs: dict[str, str] = {}
        for stream in reuse:
            found = self._r.hget(keys[3], stream)
            if found is None and old_doc is not None:
                found = old_doc["snapshots"].get(stream)
            if found is None:
                raise UnknownReuseError(partition_id, stream, epoch)
            refs[stream] = _text(found)
        seq = int(self._r.incr(self._key("seq", partition_id)))
        pairs = snapshots.items() if isinstance(snapshots, Mapping) else snapshots
        written: dict[str, str] = {}
        total = 0

        def checked() -> Iterable[tuple[str, tuple[str, bytes]]]:
            nonlocal total
            for stream, blob in pairs:
                self._check_blob(stream, blob)
                if stream in refs or stream in written:
                    raise ValueError(
                        f"stream {stream!r} is both in snapshots and in reuse (or twice in snapshots); expected it once"
                    )
                total += len(blob)
                yield stream, (self._blob_key("snap", partition_id, stream, epoch, seq), blob)

        try:
            self._write_blobs(checked(), written)
        except BaseException:
            self._discard(list(written.values()))
            raise
        fresh = list(written)
        refs.update(written)
        doc = {
            "format": MANIFEST_FORMAT,
            "partition": partition_id,
            "epoch": epoch,
            "seq": seq,
            "written_at_ms": int(time.time() * 1000),
            "snapshots": dict(sorted(refs.items())),
            "manifest": user_manifest,
        }
        blob_keys = list(dict.fromkeys(refs.values()))
        argv: list[Any] = [epoch, "1" if old_raw is not None else "0", old_raw or b"", json.dumps(doc)]
        argv += [len(blob_keys), *blob_keys, *fresh]
        result = self._commit(keys=keys, args=argv)
        status = _text(result[0])
        if status != "ok":
            self._discard(list(written.values()))
            self._raise_for(status, result, partition_id, epoch, "checkpoint")
        (log.info if written else log.debug)(  # an idle re-check rewrites the manifest only: not worth a line
            "state.checkpoint", partition=partition_id, epoch=epoch, seq=seq, written=len(written),
            reused=len(reuse), bytes=total, gc=int(result[1]),
        )
        return doc

    # ---- SnapshotStore -----------------------------------------------------------------------------------
    @_store_errors
    def read_snapshot(self, key: str) -> bytes:
        """The blob under `key`; raises `MissingSnapshotError` when it does not exist."""
        blob = self._read_blob(key)
        if blob is None:
            raise MissingSnapshotError(key)
        return blob

    @_store_errors
    def spill(self, partition_id: str, epoch: int, stream_key: str, blob: bytes) -> str:
        """Store an evicted session's blob for this epoch; returns its key. Fenced like `write_checkpoint`."""
        self._check_blob(stream_key, blob)
        self._ensure_epoch(partition_id, epoch, "spill")
        seq = int(self._r.incr(self._key("seq", partition_id)))
        key = self._blob_key("spill", partition_id, stream_key, epoch, seq)
        written: dict[str, str] = {}
        try:
            self._write_blobs([(stream_key, (key, blob))], written)
        except BaseException:
            self._discard([key])
            raise
        keys = [self._key("epoch", partition_id), self._key("spilled", partition_id), self._key("refs", partition_id)]
        result = self._spill(keys=keys, args=[epoch, stream_key, key])
        status = _text(result[0])
        if status != "ok":
            self._discard([key])
            self._raise_for(status, result, partition_id, epoch, "spill")
        log.debug("state.spilled", partition=partition_id, epoch=epoch, stream=stream_key, bytes=len(blob))
        return key

    @_store_errors
    def load_spilled(self, partition_id: str, stream_key: str) -> bytes | None:
        """The blob last spilled for `stream_key` in the current epoch, or None."""
        key = self._r.hget(self._key("spilled", partition_id), stream_key)
        if key is None:
            return None
        blob = self._read_blob(key)
        if blob is None:
            raise MissingSnapshotError(
                _text(key), f" (spill index of partition {partition_id!r}, stream {stream_key!r})"
            )
        return blob

    # ---- helpers -----------------------------------------------------------------------------------------
    @staticmethod
    def _check_blob(stream: str, blob: bytes) -> None:
        if not isinstance(stream, str) or not stream:
            raise ValueError(f"expected a non-empty str stream key, got {stream!r}")
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise TypeError(f"snapshot of stream {stream!r}: expected bytes, got {type(blob).__name__}")
        if len(blob) > MAX_BLOB_BYTES:
            raise ValueError(f"snapshot of stream {stream!r}: expected at most {MAX_BLOB_BYTES} bytes, got {len(blob)}")

    def _ensure_epoch(self, partition_id: str, epoch: int, action: str) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            raise ValueError(f"expected an epoch returned by claim() (int >= 1), got {epoch!r}")
        current = self.current_epoch(partition_id)
        if current != epoch:
            raise _fence_error(partition_id, epoch, current, action)

    def _write_blobs(self, blobs: Iterable[tuple[str, tuple[str, bytes]]], written: dict[str, str]) -> None:
        """RPUSH each blob in parts, pipelined in bounded batches (one blob at a time when paced); record each
        stream's key in `written` as soon as its first part is queued. The first part and the pending TTL go in
        one atomic script, so a key never exists without its expiry, whatever point a failure hits. Keys are
        fresh (unique seq), so nothing is appended to an existing list."""
        pipe = self._r.pipeline(transaction=False)
        queued = 0
        for i, (stream, (key, blob)) in enumerate(blobs):
            if self._pace_s and i:
                time.sleep(self._pace_s)
            ttl_ms = int((self._pending_ttl_s + self._pace_s * (i + 1)) * 1000)
            view = memoryview(blob)
            self._start_blob(keys=[key], args=[view[:BLOB_PART_BYTES], ttl_ms], client=pipe)
            for start in range(BLOB_PART_BYTES, len(view), BLOB_PART_BYTES):
                pipe.rpush(key, view[start : start + BLOB_PART_BYTES])
            written[stream] = key
            queued += len(blob)
            if self._pace_s or queued >= _PIPELINE_BYTES:
                pipe.execute()
                queued = 0
        pipe.execute()

    def _read_blob(self, key: str | bytes) -> bytes | None:
        """The blob under `key` (parts joined), or None when the key does not exist."""
        parts = cast(list[bytes], self._r.lrange(key, 0, -1))  # bytes: decode_responses is False (see __init__)
        return b"".join(parts) if parts else None

    def _discard(self, keys: list[str]) -> None:
        if not keys:
            return
        try:
            self._r.unlink(*keys)
        except redis.RedisError as exc:  # their TTL collects them anyway
            log.warning("state.discard_failed", keys=len(keys), error=str(exc))

    @staticmethod
    def _raise_for(status: str, result: list[Any], partition_id: str, epoch: int, action: str) -> None:
        if status == "fenced":
            current = _text(result[1])
            raise _fence_error(partition_id, epoch, int(current) if current else None, action)
        if status == "conflict":
            raise StateStoreError(
                f"{action} for partition {partition_id!r}: the manifest changed while epoch {epoch} was writing; "
                "expected a single writer per partition and epoch"
            )
        if status == "missing":
            raise MissingSnapshotError(
                _text(result[1]), f" when committing the {action} of partition {partition_id!r} (expired, or evicted "
                "by maxmemory?)"
            )
        raise StateStoreError(f"{action}: unexpected script result {result!r}")

    @staticmethod
    def _parse_manifest(key: str, raw: Any) -> dict[str, Any]:
        """The stored document as a dict, checked against `CheckpointDocument`; anything else (not JSON, nested
        too deep, wrong shape or types, another format) is `CorruptStateError` naming the key."""
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CorruptStateError(f"manifest {key!r}: expected JSON, got {bytes(raw[:80])!r}: {type(exc).__name__}: "
                                    f"{str(exc)[:200]}") from exc
        try:
            CheckpointDocument.model_validate(doc)
        except (ValidationError, RecursionError) as exc:
            raise CorruptStateError(
                f"manifest {key!r}: expected a checkpoint document (format {MANIFEST_FORMAT}, snapshots: "
                f"{{stream: key}}, manifest: object), got {str(doc)[:120]}: {str(exc)[:300]}"
            ) from exc
        return doc


def redis_ping(url: str, timeout_s: float = 5.0, *, password: str | None = None) -> None:
    """PING the Redis at `url`; raises (`redis.RedisError`, or `StateStoreError` on a falsy reply) when it does not
    answer PONG within `timeout_s`."""
    client = connect_redis(url, password=password, socket_timeout_s=timeout_s)
    try:
        if not client.ping():
            raise StateStoreError(f"expected PONG from Redis at {redacted_address(url)}, got a falsy reply")
    finally:
        client.close()
