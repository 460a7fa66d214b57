"""The configs shipped with the package: the repository's ``configs/`` installed as ``clip_dro.configs``.

Found through importlib.resources, so an editable install, ``pip install .`` and a wheel all see the same
files, and ``--config tiny_cpu`` names a shipped config from anywhere.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

CONFIGS_DIR = Path(str(resources.files("clip_dro.configs")))
MODEL_CONFIGS_DIR = CONFIGS_DIR / "models"


def shipped_configs() -> list[str]:
    """Names of the shipped run configs (``tiny_cpu``, ``cc3m_isogclr``, ...)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it is a file; otherwise a shipped config by name (``tiny_cpu`` or
    ``tiny_cpu.yaml`` or ``configs/tiny_cpu.yaml``) when one matches; otherwise ``path`` unchanged."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = CONFIGS_DIR / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml") and shipped.is_file():
        return shipped
    return path
