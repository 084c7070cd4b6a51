"""Versioned, integrity-checked snapshots of predictor states (SPEC §3.11).

File layout: ``USPSNAP1`` magic, 8-byte big-endian header length, a JSON header (schema version, config
version and static key, leaf paths/dtypes/shapes, SHA-256 of the payload and optionally an HMAC), then the
payload: the leaves as raw little-endian bytes in header order. Nothing is unpickled; the tree structure is
rebuilt from a template state of the same static configuration and checked leaf by leaf.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from usp_core.durable import atomic_write_bytes

log = logging.getLogger(__name__)

MAGIC = b"USPSNAP1"
SNAPSHOT_SCHEMA_VERSION = 1
HMAC_ENV = "USP_SNAPSHOT_HMAC_KEY"


class SnapshotError(ValueError):
    """A snapshot is corrupted, tampered with, or of another schema/static configuration."""


def _is_key(leaf: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)


def _leaves_with_paths(tree: Any) -> list[tuple[str, np.ndarray]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path), np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf))
            for path, leaf in flat]


def _layout(template: Any) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(path, dtype, shape) of each leaf of a state or of ``jax.eval_shape`` of one, without materialising it."""
    flat, _ = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for path, leaf in flat:
        if _is_key(leaf):
            data = jax.eval_shape(jax.random.key_data, leaf)
            dtype, shape = data.dtype, data.shape
        else:
            dtype, shape = leaf.dtype, leaf.shape
        out.append((jax.tree_util.keystr(path), np.dtype(dtype), tuple(shape)))
    return out


def _hmac_key() -> bytes | None:
    key = os.environ.get(HMAC_ENV)
    return key.encode() if key else None


def encode_state(state: Any, *, config_version: str, static_key: str) -> bytes:
    """Serialise a state pytree (any leading batch axes) into snapshot bytes."""
    leaves = _leaves_with_paths(state)
    payload = b"".join(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes() for _, a in leaves)
    header = {
        "schema_version": SNAPSHOT_SCHEMA_VERSION,
        "config_version": config_version,
        "static_key": static_key,
        "created_at": time.time(),
        "leaves": [{"path": p, "dtype": a.dtype.str.lstrip("<>|="), "shape": list(a.shape)} for p, a in leaves],
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    key = _hmac_key()
    if key is not None:
        header["hmac_sha256"] = hmac.new(key, payload, hashlib.sha256).hexdigest()
    head = json.dumps(header, sort_keys=True).encode()
    return MAGIC + len(head).to_bytes(8, "big") + head + payload


def decode_state(blob: bytes, template: Any, *, static_key: str | None = None) -> tuple[Any, dict]:
    """Rebuild a state from snapshot bytes, verifying magic, digest, HMAC, schema and leaf layout against
    ``template`` (a state of the same static configuration and batch shape)."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 8:
        raise SnapshotError("not a USP snapshot (bad magic)")
    n = int.from_bytes(blob[len(MAGIC):len(MAGIC) + 8], "big")
    start = len(MAGIC) + 8
    try:
        header = json.loads(blob[start:start + n])
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"unreadable snapshot header: {exc}") from None
    payload = blob[start + n:]
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise SnapshotError("snapshot digest mismatch (corrupted payload)")
    key = _hmac_key()
    if key is not None:
        expected = hmac.new(key, payload, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, str(header.get("hmac_sha256", ""))):
            raise SnapshotError("snapshot HMAC mismatch (tampered or signed with another key)")
    if header.get("schema_version") != SNAPSHOT_SCHEMA_VERSION:
        raise SnapshotError(f"snapshot schema {header.get('schema_version')} != {SNAPSHOT_SCHEMA_VERSION}")
    if static_key is not None and header.get("static_key") != static_key:
        raise SnapshotError("snapshot was taken with another static configuration")
    expected = _layout(template)
    if [e["path"] for e in header["leaves"]] != [p for p, _, _ in expected]:
        raise SnapshotError("snapshot layout does not match this predictor's state")
    arrays, offset = [], 0
    for meta, (_, ref_dtype, ref_shape) in zip(header["leaves"], expected, strict=True):
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        shape = tuple(meta["shape"])
        if np.dtype(meta["dtype"]) != ref_dtype or shape != ref_shape:
            raise SnapshotError(f"leaf {meta['path']}: {meta['dtype']}{shape} != {ref_dtype}{ref_shape}")
        size = int(np.prod(shape)) * dtype.itemsize
        arrays.append(np.frombuffer(payload, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape))
        offset += size
    if offset != len(payload):
        raise SnapshotError("snapshot payload length mismatch")
    leaves, treedef = jax.tree_util.tree_flatten(template)
    rebuilt = []
    for ref, arr in zip(leaves, arrays, strict=True):
        if _is_key(ref):
            rebuilt.append(jax.random.wrap_key_data(jax.numpy.asarray(arr)))
        else:
            rebuilt.append(jax.numpy.asarray(arr.astype(arr.dtype.newbyteorder("="))))
    return jax.tree_util.tree_unflatten(treedef, rebuilt), header


class SnapshotStore:
    """A directory of snapshots ``<name>.<ns timestamp>.snap``, keeping the newest ``keep``."""

    def __init__(self, directory: str | os.PathLike[str], name: str = "predictor", keep: int = 5):
        self.directory = Path(directory)
        self.name = name
        self.keep = keep

    def paths(self) -> list[Path]:
        return sorted(self.directory.glob(f"{self.name}.*.snap"), reverse=True)

    def save(self, state: Any, *, config_version: str, static_key: str) -> Path:
        path = self.directory / f"{self.name}.{time.time_ns():020d}.snap"
        atomic_write_bytes(path, encode_state(state, config_version=config_version, static_key=static_key))
        for old in self.paths()[self.keep:]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, template: Any, *, static_key: str | None = None) -> tuple[Any, dict] | None:
        """The newest valid snapshot; corrupted ones are skipped with a logged event; None means cold start."""
        for path in self.paths():
            try:
                return decode_state(path.read_bytes(), template, static_key=static_key)
            except (SnapshotError, OSError) as exc:
                log.warning("skipping invalid snapshot %s: %s", path, exc)
        log.warning("no valid snapshot in %s: cold start", self.directory)
        return None


def static_key_of(cfg) -> str:
    """A short stable digest of the static configuration (the compilation key)."""
    return hashlib.sha256(repr(cfg.static).encode()).hexdigest()[:16]
