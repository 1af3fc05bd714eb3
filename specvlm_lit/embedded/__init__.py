"""The embedded default target: a small LLaVA trained by the project on synthetic data."""

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
