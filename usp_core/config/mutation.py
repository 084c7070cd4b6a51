"""Atomic, validated, audited rewrite of ``config/config.toml``; rollback; show/diff (SPEC §6).

Crash safety: the new file is written to a temp file in the same directory, fsynced, ``os.replace``d over the
old one and the directory is fsynced, so a crash at any point leaves the old or the new file, never a mix.
Writers serialise on an exclusive ``flock`` of ``.<name>.lock`` next to the config. The kernel releases a
flock when its holder dies, so a lock left by a SIGKILLed process never blocks; the PID written into the
lock file only lets the next holder detect (and report) that its predecessor died holding it.

Fault injection for tests: ``USP_MUTATION_FAULT=<point>`` SIGKILLs the writer at that point and
``USP_MUTATION_PAUSE=<point>:<seconds>`` sleeps there (points: :data:`FAULT_POINTS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import difflib
import fcntl
import logging
import math
import os
import secrets
import signal
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import tomlkit

from usp_core.config.audit import append_audit_record, count_recent, read_audit_records, utc_now
from usp_core.config.loader import ConfigError, PredictorConfig, coerce_value, flatten_toml, resolve_key
from usp_core.config.schema import BY_KEY
from usp_core.durable import fsync_directory, pid_alive

log = logging.getLogger(__name__)

FAULT_ENV = "USP_MUTATION_FAULT"
PAUSE_ENV = "USP_MUTATION_PAUSE"
FAULT_POINTS: tuple[str, ...] = (
    "locked", "validated", "backup_temp_written", "backup_temp_fsynced", "backup_replaced", "backup_dir_fsynced",
    "backup_written", "temp_written", "temp_fsynced", "replaced", "dir_fsynced", "audited",
)
BACKUP_DIR_NAME = "backups"
CONFIG_FILE_MODE = 0o644
STATE_FILE_MODE = 0o600
STALE_PREFIX = "stale:"


class GuardViolation(ConfigError):
    """A valid change the mutation policy blocks (rate limit, relative change)."""


class MutationLockTimeout(TimeoutError):
    """Another writer held the config lock for longer than the timeout."""


@dataclasses.dataclass(frozen=True)
class MutationResult:
    applied: bool
    event: str
    reason: str
    trigger: str
    delta: dict[str, tuple[Any, Any]]
    version_before: str | None
    version_after: str | None
    backup_path: str | None
    audit_record: dict[str, Any] | None
    config: PredictorConfig | None
    stale_lock_pid: int | None = None


def fault_point(name: str) -> None:
    """Test hook: kill or pause this process at a named point of the write protocol."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    pause = os.environ.get(PAUSE_ENV, "")
    if pause.partition(":")[0] == name:
        time.sleep(float(pause.partition(":")[2] or 0.1))


def lock_path_for(config_path: str | os.PathLike[str]) -> Path:
    p = Path(config_path)
    return p.parent / f".{p.name}.lock"


@contextlib.contextmanager
def config_lock(config_path: str | os.PathLike[str], *, timeout: float = 30.0) -> Iterator[int | None]:
    """Hold the exclusive writer lock of ``config_path``; yields the PID of a dead previous holder or None."""
    lock_path = lock_path_for(config_path)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, STATE_FILE_MODE)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                    raise MutationLockTimeout(
                        f"config lock {lock_path} held by pid {holder or '?'} for more than {timeout:g} s") from None
                time.sleep(0.005)
        stale_pid = None
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous.isdigit() and int(previous) != os.getpid() and not pid_alive(int(previous)):
            stale_pid = int(previous)
            log.warning("cleared stale config lock %s of dead pid %d", lock_path, stale_pid)
            _remove_stale_temps(Path(config_path))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        fault_point("locked")
        try:
            yield stale_pid
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _remove_stale_temps(config_path: Path) -> None:
    """Temp files of a writer that died (only called while holding the lock, so no live writer owns them)."""
    for d in (config_path.parent, config_path.parent / BACKUP_DIR_NAME):
        if d.is_dir():
            for tmp in d.glob(f".{config_path.name}.*.tmp"):
                tmp.unlink(missing_ok=True)
            for tmp in d.glob(".backup.*.tmp"):
                tmp.unlink(missing_ok=True)


def _write_file_durably(path: Path, data: bytes, *, mode: int, exclusive: bool, tag: str) -> None:
    """tmp in the same directory -> fsync -> rename (or link when ``exclusive``) -> directory fsync."""
    tmp = path.parent / (f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp" if not exclusive
                         else f".backup.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        fault_point(f"{tag}temp_written")
        os.fsync(fd)
        fault_point(f"{tag}temp_fsynced")
    finally:
        os.close(fd)
    try:
        if exclusive:
            os.link(tmp, path)  # fails if the name exists: a backup is never overwritten
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fault_point(f"{tag}replaced")
    fsync_directory(path.parent)
    fault_point(f"{tag}dir_fsynced")


def project_root(config_path: str | os.PathLike[str]) -> Path:
    """The directory relative paths of the config resolve against: the parent of a ``config/`` folder."""
    parent = Path(config_path).resolve().parent
    return parent.parent if parent.name == "config" else parent


def resolve_audit_log(config_path: str | os.PathLike[str], cfg: Mapping[str, Any],
                      audit_log: str | os.PathLike[str] | None = None) -> Path:
    p = Path(audit_log if audit_log is not None else cfg["audit.audit_log"])
    return p if p.is_absolute() else project_root(config_path) / p


def parse_config_text(text: str, *, source: str) -> PredictorConfig:
    """The config a TOML text holds, exactly as written (no environment overrides)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: malformed TOML: {exc}") from None
    try:
        return PredictorConfig(flatten_toml(doc, source=source), source=source)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def render_changes(text: str, changes: Mapping[str, Any]) -> str:
    """``text`` with only the values of ``changes`` (``section.name`` keys) replaced; comments and order kept."""
    doc = tomlkit.parse(text)
    for key, value in changes.items():
        section, name = key.split(".", 1)
        if section not in doc or name not in doc[section]:
            raise ConfigError(f"{key} is not present in the TOML document")
        doc[section][name] = list(value) if isinstance(value, tuple) else value  # tomlkit keeps the item's trivia
    return tomlkit.dumps(doc)


def _relative_change(key: str, old: float, new: float) -> float:
    f = BY_KEY[key]
    floor = 1e-3 * (f.high - f.low) if f.low is not None and f.high is not None else 1e-12
    return abs(new - old) / max(abs(old), floor)


def validate_changes(current: PredictorConfig, changes: Mapping[str, Any], *,
                     check_relative_change: bool = True) -> tuple[PredictorConfig, dict[str, tuple[Any, Any]]]:
    """The merged config and the delta ``{key: (old, new)}`` of the keys that change; ConfigError otherwise."""
    locked_by_policy = set(current["mutation_policy.locked_keys"])
    max_rel = current["mutation_policy.max_relative_change"]
    canonical: dict[str, Any] = {}
    for name, value in changes.items():
        key = resolve_key(name)
        field = BY_KEY[key]
        if field.locked:
            raise ConfigError(f"{key} is locked by the schema and cannot be mutated")
        if key in locked_by_policy:
            raise ConfigError(f"{key} is listed in mutation_policy.locked_keys and cannot be mutated")
        canonical[key] = coerce_value(field, value, source="mutation")
    delta = {k: (current[k], v) for k, v in canonical.items() if current[k] != v}
    if check_relative_change:
        for key, (old, new) in delta.items():
            if BY_KEY[key].kind == "float":
                rel = _relative_change(key, old, new)
                if rel > max_rel and not math.isclose(rel, max_rel):
                    raise GuardViolation(f"{key}: relative change {rel:.4g} ({old!r} -> {new!r}) exceeds "
                                      f"mutation_policy.max_relative_change={max_rel:g}")
    merged = current.replace({k: new for k, (_, new) in delta.items()}, source="mutation")
    return merged, delta


def _backup_name(version: str, now: dt.datetime, config_name: str) -> str:
    stem = Path(config_name).stem
    return f"{stem}.{now.astimezone(dt.UTC).strftime('%Y%m%dT%H%M%S.%fZ')}.{version}.toml"


def write_backup(config_path: Path, data: bytes, version: str, now: dt.datetime) -> Path:
    """A durable, never-overwritten copy of ``data`` under ``<config dir>/backups/``."""
    backup_dir = config_path.parent / BACKUP_DIR_NAME
    backup_dir.mkdir(mode=0o700, exist_ok=True)
    base = _backup_name(version, now, config_path.name)
    for attempt in range(1000):
        name = base if attempt == 0 else base.replace(".toml", f".{attempt}.toml")
        try:
            _write_file_durably(backup_dir / name, data, mode=STATE_FILE_MODE, exclusive=True, tag="backup_")
            return backup_dir / name
        except FileExistsError:
            continue
    raise OSError(f"could not find a free backup name for {base} in {backup_dir}")


def _last_audited_version(audit_path: Path) -> str | None:
    for rec in reversed(read_audit_records(audit_path)):
        if rec.get("event") in ("MUTATION_APPLIED", "ROLLBACK") and rec.get("config_version_after"):
            return rec["config_version_after"]
    return None


def _drift_note(audit_path: Path, current_version: str) -> str:
    last = _last_audited_version(audit_path)
    if last is not None and last != current_version:
        return (f"; note: the file's version {current_version} differs from the last audited version {last} "
                "(an unaudited edit, or a writer that died after replacing the file)")
    return ""


def stale_reason(expected_version: str, found_version: str) -> str:
    """Why a compare-and-swap write was refused (starts with :data:`STALE_PREFIX`)."""
    return (f"{STALE_PREFIX} judged against config version {expected_version}, but the file now holds "
            f"{found_version} (another promotion, a rollback or an edit came first); nothing written")


def _replace_config(path: Path, old_bytes: bytes, new_bytes: bytes, old_version: str, now: dt.datetime) -> Path:
    backup = write_backup(path, old_bytes, old_version, now)
    fault_point("backup_written")
    mode = (os.stat(path).st_mode & 0o777 & CONFIG_FILE_MODE) or CONFIG_FILE_MODE
    _write_file_durably(path, new_bytes, mode=mode, exclusive=False, tag="")
    return backup


def atomic_write_config(
    path: str | os.PathLike[str],
    changes: Mapping[str, Any],
    trigger: str,
    *,
    audit_log: str | os.PathLike[str] | None = None,
    objective: Mapping[str, Any] | None = None,
    mlflow_run_id: str | None = None,
    now: dt.datetime | None = None,
    reason: str = "",
    enforce_guards: bool = True,
    lock_timeout: float = 30.0,
    expected_version: str | None = None,
) -> MutationResult:
    """Validate ``changes`` against the schema and the mutation policy, then atomically rewrite ``path``.

    Every attempt, applied or rejected, appends one audit record. A rejected attempt leaves the file as it
    was and returns ``applied=False`` with the reason. Guards (``enforce_guards``): at most
    ``mutation_policy.max_promotions_per_hour`` applied promotions (trigger ``"promotion"``) in the last hour,
    and no continuous parameter changing by more than ``mutation_policy.max_relative_change`` (relative).
    With ``expected_version`` the write is a compare-and-swap: if the version read under the lock differs,
    nothing is written and the attempt is audited as stale (:func:`stale_reason`, with ``expected_version``
    and ``found_version`` in the record).
    """
    path = Path(path)
    with config_lock(path, timeout=lock_timeout) as stale_pid:
        now = now or utc_now()
        old_bytes = path.read_bytes()
        current = parse_config_text(old_bytes.decode("utf-8"), source=str(path))
        audit_path = resolve_audit_log(path, current, audit_log)
        note = _drift_note(audit_path, current.version)
        if stale_pid is not None:
            note += f"; cleared a stale lock of dead pid {stale_pid}"

        def reject(why: str, delta: Mapping[str, tuple[Any, Any]] | None = None,
                   extra: Mapping[str, Any] | None = None) -> MutationResult:
            rec = append_audit_record(
                audit_path, event="MUTATION_REJECTED", trigger=trigger, delta=delta or {}, objective=objective,
                config_version_before=current.version, config_version_after=current.version,
                mlflow_run_id=mlflow_run_id, reason=why + note, now=now, extra=extra)
            return MutationResult(False, "MUTATION_REJECTED", why, trigger, dict(delta or {}), current.version,
                                  current.version, None, rec, current, stale_pid)

        if expected_version is not None and current.version != expected_version:
            earlier = find_applied_write(path, current, expected_version, changes)
            if earlier is None:
                return reject(stale_reason(expected_version, current.version), _requested_delta(current, changes),
                              {"expected_version": expected_version, "found_version": current.version})
            backup, delta = earlier
            rec = None
            if not _audited_as_applied(audit_path, current.version):
                rec = append_audit_record(
                    audit_path, event="MUTATION_APPLIED", trigger=trigger, delta=delta, objective=objective,
                    config_version_before=expected_version, config_version_after=current.version,
                    backup_path=str(backup), mlflow_run_id=mlflow_run_id,
                    reason=(reason or "applied") + "; recovered: written before a crash, audited now" + note, now=now)
            return MutationResult(True, "MUTATION_APPLIED", "already applied (recovered after a crash)", trigger, delta,
                                  expected_version, current.version, str(backup), rec, current, stale_pid)
        try:
            merged, delta = validate_changes(current, changes, check_relative_change=enforce_guards)
        except GuardViolation as exc:
            return reject(f"guard: {exc}", _requested_delta(current, changes))
        except ConfigError as exc:
            return reject(f"invalid change: {exc}", _requested_delta(current, changes))
        if not delta:
            return reject("no change: every requested value equals the current one")
        if enforce_guards and trigger == "promotion":
            limit = current["mutation_policy.max_promotions_per_hour"]
            recent = count_recent(audit_path, event="MUTATION_APPLIED", trigger="promotion", now=now)
            if recent >= limit:
                return reject(f"guard: rate limit: {recent} promotions applied in the last hour "
                              f"(mutation_policy.max_promotions_per_hour={limit})", delta)
        new_text = render_changes(old_bytes.decode("utf-8"), {k: new for k, (_, new) in delta.items()})
        written = parse_config_text(new_text, source=f"{path} (rendered)")
        if written != merged:
            raise AssertionError(f"rendered TOML does not round-trip to the merged config ({path})")
        fault_point("validated")
        backup = _replace_config(path, old_bytes, new_text.encode("utf-8"), current.version, now)
        rec = append_audit_record(
            audit_path, event="MUTATION_APPLIED", trigger=trigger, delta=delta, objective=objective,
            config_version_before=current.version, config_version_after=merged.version,
            backup_path=str(backup), mlflow_run_id=mlflow_run_id, reason=(reason or "applied") + note, now=now)
        fault_point("audited")
        return MutationResult(True, "MUTATION_APPLIED", reason or "applied", trigger, delta, current.version,
                              merged.version, str(backup), rec, merged, stale_pid)


def _requested_delta(current: PredictorConfig, changes: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    out = {}
    for name, value in changes.items():
        try:
            key = resolve_key(name)
            out[key] = (current[key], value)
        except ConfigError:
            out[str(name)] = (None, value)
    return out


def find_applied_write(path: str | os.PathLike[str], current: PredictorConfig, expected_version: str,
                       changes: Mapping[str, Any]) -> tuple[Path, dict[str, tuple[Any, Any]]] | None:
    """(backup, delta) when ``current`` is exactly ``changes`` written over ``expected_version``: the same write
    already happened (a writer killed between its rename and its audit record, or before the registry moved),
    so a rerun completes it instead of calling it stale. None otherwise."""
    for candidate in reversed(list_backups(path)):
        if f".{expected_version}." not in candidate.name:
            continue
        try:
            before = parse_config_text(candidate.read_text(encoding="utf-8"), source=str(candidate))
            merged, delta = validate_changes(before, changes, check_relative_change=False)
        except (ConfigError, GuardViolation, OSError, UnicodeDecodeError):
            continue
        if before.version == expected_version and merged.version == current.version:
            return candidate, delta
    return None


def _audited_as_applied(audit_path: Path, version: str) -> bool:
    return any(rec.get("event") == "MUTATION_APPLIED" and rec.get("config_version_after") == version
               for rec in read_audit_records(audit_path))


def list_backups(config_path: str | os.PathLike[str]) -> list[Path]:
    """Backups of ``config_path``, oldest first (names sort by their UTC timestamp)."""
    p = Path(config_path)
    d = p.parent / BACKUP_DIR_NAME
    return sorted(d.glob(f"{p.stem}.*.toml")) if d.is_dir() else []


def _rollback_target(path: Path, current: PredictorConfig, audit_path: Path,
                     to_version: str | None) -> tuple[Path, PredictorConfig]:
    def loadable(candidate: Path) -> PredictorConfig | None:
        try:
            return parse_config_text(candidate.read_text(encoding="utf-8"), source=str(candidate))
        except (ConfigError, OSError, UnicodeDecodeError):
            return None

    if to_version is None:
        # Walk back: the backup taken by the last mutation that produced the current version.
        for rec in reversed(read_audit_records(audit_path)):
            # A ROLLBACK record's backup is the version rolled away from, so only applied mutations lead back.
            if (rec.get("event") == "MUTATION_APPLIED"
                    and rec.get("config_version_after") == current.version and rec.get("backup_path")):
                candidate = Path(rec["backup_path"])
                cfg = loadable(candidate) if candidate.exists() else None
                if cfg is not None and cfg.version != current.version:
                    return candidate, cfg
    for candidate in reversed(list_backups(path)):
        if to_version is not None and f".{to_version}." not in candidate.name:
            continue
        cfg = loadable(candidate)
        if cfg is None:
            continue
        if (to_version is None and cfg.version != current.version) or (to_version is not None and cfg.version == to_version):
            return candidate, cfg
    want = f"version {to_version}" if to_version else "a previous version"
    raise ConfigError(f"no valid backup of {want} found under {path.parent / BACKUP_DIR_NAME}")


def rollback(
    path: str | os.PathLike[str],
    *,
    to_version: str | None = None,
    audit_log: str | os.PathLike[str] | None = None,
    registry: Any = None,
    trigger: str = "rollback",
    now: dt.datetime | None = None,
    lock_timeout: float = 30.0,
) -> MutationResult:
    """Restore the exact bytes of a previous config atomically (default: the one before the current version).

    The current file is backed up first; a ``ROLLBACK`` audit record holds the delta. With ``registry`` (a
    :class:`usp_core.promotion.registry.ConfigRegistry`) the ``champion`` alias is re-pointed.
    """
    path = Path(path)
    with config_lock(path, timeout=lock_timeout) as stale_pid:
        now = now or utc_now()
        old_bytes = path.read_bytes()
        current = parse_config_text(old_bytes.decode("utf-8"), source=str(path))
        audit_path = resolve_audit_log(path, current, audit_log)
        source, target = _rollback_target(path, current, audit_path, to_version)
        new_bytes = source.read_bytes()
        delta = {k: (current[k], target[k]) for k in current if current[k] != target[k]}
        backup = _replace_config(path, old_bytes, new_bytes, current.version, now)
        why = f"restored {source.name}"
        rec = append_audit_record(
            audit_path, event="ROLLBACK", trigger=trigger, delta=delta, config_version_before=current.version,
            config_version_after=target.version, backup_path=str(backup), reason=why, now=now,
            extra={"restored_from": str(source)})
    if registry is not None:
        registry.reconcile(path)
    return MutationResult(True, "ROLLBACK", why, trigger, delta, current.version, target.version, str(backup),
                          rec, target, stale_pid)


def _as_config(c: PredictorConfig | str | os.PathLike[str]) -> PredictorConfig:
    if isinstance(c, PredictorConfig):
        return c
    p = Path(c)
    return parse_config_text(p.read_text(encoding="utf-8"), source=str(p))


def show_config(path: str | os.PathLike[str] = "config/config.toml", *, section: str | None = None) -> str:
    """Human-readable listing: version, then ``key = value`` per field (optionally one section)."""
    cfg = _as_config(path)
    lines = [f"# {cfg.source}  version {cfg.version}"]
    for key, value in cfg.items():
        if section is None or key.startswith(section + "."):
            lines.append(f"{key} = {list(value) if isinstance(value, tuple) else value!r}")
    return "\n".join(lines)


def diff_configs(a: PredictorConfig | str | os.PathLike[str],
                 b: PredictorConfig | str | os.PathLike[str]) -> dict[str, tuple[Any, Any]]:
    """``{key: (value in a, value in b)}`` for every key whose value differs."""
    ca, cb = _as_config(a), _as_config(b)
    return {k: (ca[k], cb[k]) for k in ca if ca[k] != cb[k]}


def format_diff(delta: Mapping[str, tuple[Any, Any]]) -> str:
    return "\n".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in delta.items()) or "(no differences)"


def text_diff(a: str, b: str, *, name: str = "config.toml") -> str:
    """Unified diff of two TOML texts (what a mutation changed in the file)."""
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), f"a/{name}", f"b/{name}", n=0))
