"""Study checkpoints: the digest travels with the payload, so no crash point leaves an unloadable checkpoint
(issue 12); corruption is rejected; checkpoints with only a sidecar digest still load."""

from __future__ import annotations

import hashlib
import json
import os

import optuna
import pytest

from usp_core.tuning import checkpoint as ckpt
from usp_core.tuning.checkpoint import IntegrityError

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(n_trials: int) -> optuna.Study:
    study = optuna.create_study(study_name="ck", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", -1.0, 1.0) ** 2, n_trials=n_trials)
    return study


def _n_trials(path) -> int:
    return len(ckpt.read_checkpoint(path)["trials"])


def _temp_files(directory) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def _crash_on_call(monkeypatch, name: str, k: int) -> None:
    """Make the k-th call of os.<name> raise, as a kill at that point would stop the save."""
    real, calls = getattr(os, name), []

    def crashing(*args, **kwargs):
        calls.append(args)
        if len(calls) == k + 1:
            raise OSError(f"simulated crash at os.{name} call {k}")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, crashing)


def _legacy_save(study: optuna.Study, path) -> None:
    """The previous format: plain JSON plus a ``<path>.sha256`` sidecar."""
    payload = json.dumps(ckpt.study_to_document(study), sort_keys=True, indent=1).encode()
    path.write_bytes(payload)
    ckpt.sidecar_path(path).write_text(f"{hashlib.sha256(payload).hexdigest()}  {path.name}\n")


def test_round_trip_and_sidecar_for_external_tools(tmp_path):
    path = tmp_path / "ck.json"
    digest = ckpt.save_study(_study(3), path, meta={"tier": "fast"})
    doc = ckpt.read_checkpoint(path)
    assert doc["study_name"] == "ck" and doc["meta"] == {"tier": "fast"} and len(doc["trials"]) == 3
    assert json.loads(path.read_text())["body"] == doc  # the file itself stays plain JSON
    assert ckpt.sidecar_path(path).read_text() == f"{digest}  ck.json\n"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    restored = ckpt.restore_study(doc, storage=None)
    assert [t.params for t in restored.trials] == [t.params for t in _study(3).trials]


@pytest.mark.parametrize("name, k", [("replace", 0), ("replace", 1), ("fsync", 0), ("fsync", 1), ("fsync", 2),
                                     ("fsync", 3)])
def test_crash_at_any_step_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, name, k):
    path = tmp_path / "ck.json"
    ckpt.save_study(_study(3), path)
    _crash_on_call(monkeypatch, name, k)
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.save_study(_study(5), path)
    monkeypatch.undo()
    assert _n_trials(path) in (3, 5)  # the previous or the new study, never an IntegrityError
    assert _temp_files(tmp_path) == []


def test_crash_before_the_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.json"
    ckpt.save_study(_study(3), path)
    _crash_on_call(monkeypatch, "replace", 0)
    with pytest.raises(OSError):
        ckpt.save_study(_study(5), path)
    monkeypatch.undo()
    assert _n_trials(path) == 3


def test_missing_or_stale_sidecar_does_not_matter(tmp_path):
    path = tmp_path / "ck.json"
    ckpt.save_study(_study(3), path)
    ckpt.sidecar_path(path).write_text(f"{'0' * 64}  ck.json\n")
    assert _n_trials(path) == 3
    ckpt.sidecar_path(path).unlink()
    assert _n_trials(path) == 3


@pytest.mark.parametrize("where", [0.5, 0.9])
def test_corrupted_body_is_rejected(tmp_path, where):
    path = tmp_path / "ck.json"
    ckpt.save_study(_study(3), path)
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * where)] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="corrupted.*SHA-256"):
        ckpt.read_checkpoint(path)


def test_truncated_or_damaged_header_is_rejected(tmp_path):
    path = tmp_path / "ck.json"
    ckpt.save_study(_study(3), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IntegrityError, match="truncated"):
        ckpt.read_checkpoint(path)
    path.write_bytes(b"[" + raw[1:])
    with pytest.raises(IntegrityError):  # no embedded digest: judged by the sidecar, which disagrees
        ckpt.read_checkpoint(path)
    ckpt.sidecar_path(path).unlink()
    with pytest.raises(FileNotFoundError, match="no embedded digest"):
        ckpt.read_checkpoint(path)


def test_legacy_checkpoint_with_sidecar_still_loads(tmp_path):
    path = tmp_path / "old.json"
    _legacy_save(_study(4), path)
    assert _n_trials(path) == 4
    path.write_bytes(path.read_bytes().replace(b'"ck"', b'"xx"'))
    with pytest.raises(IntegrityError, match="SHA-256 mismatch"):
        ckpt.read_checkpoint(path)
    ckpt.sidecar_path(path).unlink()
    with pytest.raises(FileNotFoundError, match="sidecar"):
        ckpt.read_checkpoint(path)


def test_verified_body_of_the_wrong_kind_is_rejected(tmp_path):
    path = tmp_path / "other.json"
    body = json.dumps({"format": "something-else"}).encode()
    path.write_bytes(body)
    ckpt.sidecar_path(path).write_text(hashlib.sha256(body).hexdigest())
    with pytest.raises(IntegrityError, match="not a usp-optuna-study"):
        ckpt.read_checkpoint(path)
