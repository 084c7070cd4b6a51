"""Hot reload of the configuration (SPEC §6, seed V-CRIT-4).

A :class:`ConfigWatcher` notices a change by mtime (cheap ``stat``) AND content hash (an equal mtime from a
coarse clock, or a touched-but-unchanged file, are told apart by the bytes), re-validates the file and swaps
an immutable :class:`PredictorConfig`. A bad file keeps the previous config and reports the error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from pathlib import Path

from usp_core.config.loader import ConfigError, PredictorConfig, env_overrides
from usp_core.config.mutation import parse_config_text


def needs_recompile(old: PredictorConfig, new: PredictorConfig) -> bool:
    """A change of any static field is a new compilation; dynamic-only changes reuse the compiled step."""
    return old.static != new.static


@dataclasses.dataclass(frozen=True)
class ReloadEvent:
    changed: bool
    config: PredictorConfig
    previous: PredictorConfig | None = None
    recompile: bool = False
    error: str | None = None


class ConfigWatcher:
    """Holds the current config of ``path``; :meth:`poll` swaps it when the file changed and is valid."""

    def __init__(self, path: str | os.PathLike[str], *, environ: dict[str, str] | None = None):
        self.path = Path(path)
        self._environ = environ
        self._lock = threading.Lock()
        self._mtime_ns = os.stat(self.path).st_mtime_ns
        data = self.path.read_bytes()
        self._config = self._parse(data)
        self._digest = hashlib.sha256(data).hexdigest()
        self.last_error: str | None = None

    def _parse(self, data: bytes) -> PredictorConfig:
        """The config these exact bytes hold, with ``USP_<SECTION>__<KEY>`` overrides applied like load_config."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{self.path}: not UTF-8: {exc}") from None
        cfg = parse_config_text(text, source=str(self.path))
        env = env_overrides(os.environ if self._environ is None else self._environ)
        return cfg.replace({k: v for k, (v, _) in env.items()}, source=str(self.path)) if env else cfg

    @property
    def config(self) -> PredictorConfig:
        return self._config

    @property
    def version(self) -> str:
        return self._config.version

    def poll(self) -> ReloadEvent:
        """Check the file once. ``changed`` only when a valid, different config was swapped in."""
        with self._lock:
            try:
                mtime_ns = os.stat(self.path).st_mtime_ns
                data = self.path.read_bytes()
            except OSError as exc:
                self.last_error = f"cannot read {self.path}: {exc}"
                return ReloadEvent(False, self._config, error=self.last_error)
            digest = hashlib.sha256(data).hexdigest()
            if mtime_ns == self._mtime_ns and digest == self._digest:
                return ReloadEvent(False, self._config)
            try:
                new = self._parse(data)
            except ConfigError as exc:
                # Remember the bad bytes so the same broken file is reported once, not on every poll.
                self._mtime_ns, self._digest = mtime_ns, digest
                self.last_error = str(exc)
                return ReloadEvent(False, self._config, error=self.last_error)
            self._mtime_ns, self._digest = mtime_ns, digest
            self.last_error = None
            old = self._config
            if new == old:
                return ReloadEvent(False, old)
            self._config = new
            return ReloadEvent(True, new, previous=old, recompile=needs_recompile(old, new))
