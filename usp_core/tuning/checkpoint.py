"""Portable, non-executable study checkpoints (SPEC §5, seed V-CRIT-1 corrected: no pickle).

The study document is canonical JSON of the study's trials (distributions via
``optuna.distributions.distribution_to_json``, params, values, states, intermediate values, user and
system attrs). The checkpoint file wraps it in a JSON envelope whose header carries the SHA-256 of the
document's bytes, so the digest can never be separated from what it protects; the file is written
atomically (tmp, fsync, ``os.replace``, directory fsync), and a crash leaves either the old or the new
checkpoint, both loadable. A ``<path>.sha256`` sidecar (sha256sum format, digest of the whole file) is
written afterwards for external tools; the loader does not need it, as it may be stale after a crash.
Checkpoints of the previous format (the bare document, verified only by its sidecar) still load.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import distribution_to_json, json_to_distribution
from optuna.trial import FrozenTrial, TrialState

from usp_core.durable import atomic_write_bytes

FORMAT = "usp-optuna-study"
FORMAT_VERSION = 1
# The envelope is written and parsed as fixed bytes around the document, so that the digest is checked on
# the exact bytes that were hashed, before any of them are parsed.
_HEAD = b'{"format": "usp-optuna-checkpoint", "format_version": 1, "body_sha256": "'
_BODY = b'", "body": '
_TAIL = b"}\n"
_DIGEST_LENGTH = 64


class IntegrityError(Exception):
    """A checkpoint's content does not match its SHA-256 digest (corrupted or tampered)."""


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _from_iso(s: str | None) -> dt.datetime | None:
    return None if s is None else dt.datetime.fromisoformat(s)


def _jsonable(value: Any) -> Any:
    """User attrs must already be JSON (Optuna's RDB/Journal storages require it too)."""
    json.dumps(value, allow_nan=True)
    return value


def trial_to_dict(t: FrozenTrial) -> dict[str, Any]:
    return {
        "number": t.number,
        "state": t.state.name,
        "values": t.values,
        "params": t.params,
        "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
        "intermediate_values": {str(k): v for k, v in sorted(t.intermediate_values.items())},
        "user_attrs": _jsonable(t.user_attrs),
        "system_attrs": _jsonable(t.system_attrs),
        "datetime_start": _iso(t.datetime_start),
        "datetime_complete": _iso(t.datetime_complete),
    }


def trial_from_dict(d: Mapping[str, Any]) -> FrozenTrial:
    """A trial to add to a study. A trial that was RUNNING when saved comes back WAITING (with its
    params) so that the resumed campaign re-runs it: nothing lost, nothing duplicated."""
    state = TrialState[d["state"]]
    finished = state.is_finished()
    return FrozenTrial(  # validated by Study.add_trials
        number=d["number"],
        state=state if finished else TrialState.WAITING,
        value=None,
        values=d["values"] if finished else None,
        datetime_start=_from_iso(d["datetime_start"]) if finished else None,
        datetime_complete=_from_iso(d["datetime_complete"]) if finished else None,
        params=d["params"],
        distributions={k: json_to_distribution(v) for k, v in d["distributions"].items()},
        user_attrs=dict(d["user_attrs"]),
        system_attrs=dict(d["system_attrs"]),
        intermediate_values={int(k): v for k, v in d["intermediate_values"].items()},
        trial_id=d["number"],
    )


def study_to_document(study: optuna.Study, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "study_name": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "study_user_attrs": _jsonable(study.user_attrs),
        "meta": _jsonable(dict(meta or {})),
        "trials": [trial_to_dict(t) for t in sorted(trials, key=lambda t: t.number)],
    }


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".sha256")


def save_study(study: optuna.Study, path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> str:
    """Write the self-verifying checkpoint, then its sidecar; returns the file's hex digest (as in the sidecar)."""
    body = json.dumps(study_to_document(study, meta), sort_keys=True, indent=1).encode()
    data = _envelope(body)
    p = Path(path)
    atomic_write_bytes(p, data)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(sidecar_path(p), f"{digest}  {p.name}\n".encode())
    return digest


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified checkpoint document. IntegrityError when the content does not match its digest;
    FileNotFoundError when the checkpoint is missing, or when it has no embedded digest (previous format)
    and its sidecar is missing."""
    p = Path(path)
    raw = p.read_bytes()
    body = _unwrap(raw, p) if raw.startswith(_HEAD) else _verify_with_sidecar(raw, p)
    try:
        doc = json.loads(body)
    except ValueError as exc:  # only reachable when the digest was forged to match a broken file
        raise IntegrityError(f"{p} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise IntegrityError(f"{p} is not a {FORMAT} v{FORMAT_VERSION} checkpoint")
    return doc


def _envelope(body: bytes) -> bytes:
    return b"".join([_HEAD, hashlib.sha256(body).hexdigest().encode(), _BODY, body, _TAIL])


def _unwrap(raw: bytes, p: Path) -> bytes:
    """The document bytes of an enveloped checkpoint, verified against the digest in its header."""
    start = len(_HEAD) + _DIGEST_LENGTH + len(_BODY)
    if len(raw) < start + len(_TAIL) or not raw.endswith(_TAIL) or raw[start - len(_BODY):start] != _BODY:
        raise IntegrityError(f"checkpoint {p} is truncated or its header is damaged")
    expected = raw[len(_HEAD):len(_HEAD) + _DIGEST_LENGTH].decode("ascii", errors="replace")
    body = raw[start:-len(_TAIL)]
    actual = hashlib.sha256(body).hexdigest()
    if actual != expected:
        raise IntegrityError(f"checkpoint {p} is corrupted: SHA-256 of its body is {actual[:16]}..., "
                             f"its header says {expected[:16]}...")
    return body


def _verify_with_sidecar(raw: bytes, p: Path) -> bytes:
    """The whole file of a previous-format checkpoint, verified against its ``.sha256`` sidecar."""
    side = sidecar_path(p)
    if not side.exists():
        raise FileNotFoundError(f"checkpoint {p} has no embedded digest (previous format or damaged header) "
                                f"and its sidecar {side} is missing; refusing to load it unverified")
    text = side.read_text()
    expected = text.split()[0] if text.strip() else ""
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected:
        raise IntegrityError(f"SHA-256 mismatch for {p}: sidecar {expected[:16]}..., content {actual[:16]}...")
    return raw


def restore_study(
    doc: Mapping[str, Any],
    *,
    storage: str | optuna.storages.BaseStorage | None,
    study_name: str | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> optuna.Study:
    """Rebuild the checkpointed study in ``storage`` (trials added in number order, so numbers match).

    If the target study already holds trials, they must be a prefix of the checkpoint (same numbers,
    states, params and values); only the missing trials are added. A name that differs from the
    checkpoint's raises ValueError.
    """
    name = doc["study_name"]
    if study_name is not None and study_name != name:
        raise ValueError(f"checkpoint holds study {name!r}, not {study_name!r}")
    study = optuna.create_study(
        storage=storage, study_name=name, directions=doc["directions"], sampler=sampler,
        load_if_exists=True)
    for key, value in doc["study_user_attrs"].items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
    existing = study.get_trials(deepcopy=False)
    trials = [trial_from_dict(t) for t in doc["trials"]]
    for old, new in zip(existing, trials, strict=False):
        if (old.params, old.values, old.state) != (new.params, new.values, new.state):
            raise ValueError(f"study {name!r} in the target storage diverges from the checkpoint at trial "
                             f"{old.number}; load into an empty storage or another study name")
    study.add_trials(trials[len(existing):])
    return study
