"""Where the project, its shared data and its caches live (all overridable by environment variables)."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _env_path(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser().resolve() if value else default.resolve()


def data_root() -> Path:
    """Root of the evaluation sets (default: ../shared/data next to the project)."""
    return _env_path("REX_DATA_ROOT", PROJECT_ROOT.parent / "shared" / "data")


def weights_root() -> Path:
    """Root of the bundled checkpoints (default: ../shared/weights next to the project)."""
    return _env_path("REX_WEIGHTS_ROOT", PROJECT_ROOT.parent / "shared" / "weights")


def cache_root() -> Path:
    """Decoded-dataset and trained-model cache (default: ~/.cache/rex)."""
    return _env_path("REX_CACHE", Path.home() / ".cache" / "rex")


def results_root() -> Path:
    return _env_path("REX_RESULTS", PROJECT_ROOT / "results")
