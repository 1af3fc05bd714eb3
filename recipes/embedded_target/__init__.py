"""The embedded target's lab: build, evaluate, diagnose and demo the small LLaVA in data/embedded_target.

Run from the repository root (``python -m recipes.embedded_target.build``): the configs in ``conf/`` name
``data/...`` paths relative to it. See README.md here for the commands and the results.
"""

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
