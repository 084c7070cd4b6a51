"""Where the embedded stores live, resolved in ONE place for the CLI and the pipeline (SPEC §10).

``$DAGSTER_HOME``, else ``dagster_home/`` under the project root (``$USP_ROOT``, else the working directory,
which is the repository root for ``make`` and the CLI). Each store switches to another location or a server
by its own environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    return Path(os.environ.get("USP_ROOT") or Path.cwd()).absolute()


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or project_root() / "dagster_home").absolute()


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """``path``, else ``$USP_CONFIG_PATH``, else ``config/config.toml`` under the project root."""
    return Path(path or os.environ.get("USP_CONFIG_PATH") or project_root() / "config" / "config.toml").absolute()


def duckdb_path(path: str | os.PathLike[str] | None = None) -> Path:
    """``path``, else ``$USP_DUCKDB_PATH``, else ``usp.duckdb`` under ``$DAGSTER_HOME``."""
    return Path(path or os.environ.get("USP_DUCKDB_PATH") or dagster_home() / "usp.duckdb").absolute()



def incoming_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """``path``, else ``$USP_INCOMING_DIR``, else ``data/incoming`` under the project root: the folder the file
    sensor watches."""
    return Path(path or os.environ.get("USP_INCOMING_DIR") or project_root() / "data" / "incoming").absolute()
