"""Predictor state <-> bytes for DuckDB: an ``.npz`` of named leaves (never pickle) plus its SHA-256."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import jax
import numpy as np

FORMAT_TAG = "usp-state-npz-v1"


class StateDecodeError(ValueError):
    """A stored state does not match its digest or the predictor's state structure."""


def _leaf_names(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def encode_state(state: Any) -> tuple[bytes, str]:
    """Serialise one (unbatched) state; returns (payload, sha256 hex)."""
    leaves = jax.tree_util.tree_leaves(state)
    arrays = {f"{i:04d}": np.asarray(jax.random.key_data(x) if _is_key(x) else x) for i, x in enumerate(leaves)}
    arrays["__names__"] = np.asarray(_leaf_names(state))
    arrays["__format__"] = np.asarray(FORMAT_TAG)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    payload = buf.getvalue()
    return payload, hashlib.sha256(payload).hexdigest()


def decode_state(payload: bytes, sha256: str, template: Any) -> Any:
    """Rebuild a state shaped like ``template`` (a state or ``jax.eval_shape`` of one) after checking the digest."""
    if hashlib.sha256(payload).hexdigest() != sha256:
        raise StateDecodeError("stored predictor state does not match its SHA-256")
    with np.load(io.BytesIO(payload), allow_pickle=False) as data:
        if str(data["__format__"]) != FORMAT_TAG:
            raise StateDecodeError(f"unknown state format {data['__format__']!s}")
        names = [str(n) for n in data["__names__"]]
        leaves, treedef = jax.tree_util.tree_flatten(template)
        if names != _leaf_names(template):
            raise StateDecodeError("stored predictor state has a different structure than this predictor's")
        restored = []
        for i, like in enumerate(leaves):
            arr = data[f"{i:04d}"]
            if _is_key(like):
                restored.append(jax.random.wrap_key_data(arr))
                continue
            if arr.shape != tuple(like.shape) or arr.dtype != like.dtype:
                raise StateDecodeError(f"leaf {names[i]}: stored {arr.dtype}{arr.shape}, expected {like.dtype}{tuple(like.shape)}")
            restored.append(jax.numpy.asarray(arr))
    return jax.tree_util.tree_unflatten(treedef, restored)
