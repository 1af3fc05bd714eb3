"""OmegaConf resolvers the Hydra configs use; imported by the entry points before Hydra starts."""

from __future__ import annotations

from omegaconf import OmegaConf

MAX_DIRNAME = 200


def safe_dirname(text: str) -> str:
    """A sweep run's sub-directory name from its overrides: one path component, short enough for any filesystem.

    ``hydra.job.override_dirname`` holds values such as ``target.path=/models/llava``; used as-is, the slashes
    nest every run in directories named after the path, and long values exceed the 255-byte name limit.
    """
    name = str(text).replace("/", "_").replace("\\", "_").strip(". ") or "run"
    return name if len(name) <= MAX_DIRNAME else name[:MAX_DIRNAME].rstrip(",_") + "..."


def register() -> None:
    if not OmegaConf.has_resolver("safe_dirname"):
        OmegaConf.register_new_resolver("safe_dirname", safe_dirname)


register()
