"""Where the embedded stores live: ``$DAGSTER_HOME``, else ``dagster_home/`` under the project root
(``$USP_ROOT``, else the working directory, which is the repository root for ``make`` and the CLI)."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    return Path(os.environ.get("USP_ROOT") or Path.cwd()).absolute()


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or project_root() / "dagster_home").absolute()
