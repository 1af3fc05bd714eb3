"""Export this project's drafters to the formats vLLM and SGLang serve, and import public EAGLE-3 checkpoints.

    python -m specvlm_lit.export <drafter dir> --format speculators|sglang|eagle [--out DIR]
    python -m specvlm_lit.export --import <checkpoint dir> --target <target dir> --out <drafter dir>

See :mod:`specvlm_lit.export.formats` and docs/serving.md.
"""

from .formats import FORMATS, ExportError, ImportCheckpointError, export_drafter, import_checkpoint

__all__ = ["FORMATS", "ExportError", "ImportCheckpointError", "export_drafter", "import_checkpoint"]
