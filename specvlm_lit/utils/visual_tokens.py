"""How many image-placeholder tokens a LLaVA-style tower gives an image: the one place this is computed."""

from __future__ import annotations


def llava_visual_tokens(height: int, width: int, patch_size: int, strategy: str = "default") -> int:
    """One token per ``patch_size`` patch (the patch conv has stride ``patch_size``, so partial patches are
    dropped), plus the CLS token unless the ``"default"`` select strategy removes it."""
    if height < patch_size or width < patch_size:
        raise ValueError(f"Image {height}x{width} is smaller than one {patch_size}x{patch_size} patch.")
    n = (height // patch_size) * (width // patch_size)
    return n if strategy == "default" else n + 1
