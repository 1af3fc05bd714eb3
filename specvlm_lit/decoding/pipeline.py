"""One-call lossless speculative decoding of an image + question (the API behind ``decode.py``).

    from specvlm_lit.decoding.pipeline import SpecVLMPipeline
    pipe = SpecVLMPipeline("data/embedded_target", "outputs/train/runs/<run>/drafter")
    out = pipe.generate("cat.png", "What is in the image?", max_new_tokens=64)
    print(out.text, out.stats.sigma)
    ref = pipe.generate_ar("cat.png", "What is in the image?", max_new_tokens=64)  # HF generate(), same tokens

Everything a caller can get wrong is checked *before* any model work and raised as :class:`DecodeInputError`
(a ``ValueError``) with a one-line message: missing / unreadable image (the file is named), empty prompt,
``max_new_tokens < 1``, negative temperature, ``top_p`` outside (0, 1], negative ``top_k``, a bad seed, a bad
tree shape; and, once the target is known, a prompt + image + ``max_new_tokens`` that do not fit its context
(:func:`check_context`). Images are brought to the size the target family encodes them at first (a photo is
downscaled to the vision tower's native size when the processor does not resize: ``target.image_input_size``).
The rules themselves live once, in :mod:`.configs` (``WarpConfig``, ``TreeConfig``, ``check_int``); the
``check_*`` functions here apply them and re-raise a broken one as :class:`DecodeInputError`. Loading
problems keep their own types: :class:`~specvlm_lit.target.TargetLoadError` (target checkpoint / tokenizer),
:class:`~specvlm_lit.drafter.eagle.DrafterLoadError` (drafter directory) and
:class:`~specvlm_lit.drafter.eagle.DrafterMismatchError` (drafter trained for another target: fingerprint).

This module imports torch / transformers lazily (inside the functions that need them) so the CLI can validate a
request and fail in a fraction of a second, without paying for the heavy imports.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .configs import InvalidOption, TreeConfig, WarpConfig, check_int

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from ..targets.inputs import VisualLayout
    from .speculative import SpecStats

__all__ = [
    "DTYPES",
    "DecodeInputError",
    "DecodeRequest",
    "DecodeResult",
    "ForwardCounter",
    "PreparedPrompt",
    "SpecVLMPipeline",
    "as_decode_input_error",
    "check_context",
    "check_dtype",
    "check_int_option",
    "check_max_new_tokens",
    "check_prompt",
    "check_sampling",
    "check_seed",
    "check_target_dir",
    "check_tree",
    "drafter_kind",
    "find_exported_drafters",
    "format_stats",
    "hf_sampling_kwargs",
    "load_image",
    "pick_drafter",
    "validate_request",
]

#: dtype names accepted by the pipeline / CLI.
DTYPES = ("float32", "bfloat16", "float16")


class DecodeInputError(UserError):
    """A request or configuration that cannot be decoded; the message says what is wrong and how to fix it."""


# ------------------------------------------------------------------------------------------- validation
def load_image(image) -> Image.Image:
    """An RGB ``PIL.Image`` from a path or an image object; a missing or undecodable file raises naming the file."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        try:
            image.load()
            return image.convert("RGB")
        except (OSError, ValueError) as e:
            raise DecodeInputError(f"the given PIL image cannot be decoded ({e})") from None
    if image is None:
        raise DecodeInputError("no image given: pass image=<path to a PNG/JPEG file>")
    if not isinstance(image, (str, os.PathLike)):
        raise DecodeInputError(f"image must be a file path or a PIL.Image, got {type(image).__name__}")
    if isinstance(image, str) and not image.strip():
        raise DecodeInputError("no image given: pass image=<path to a PNG/JPEG file>")
    path = Path(image).expanduser()
    if not path.exists():
        raise DecodeInputError(f"image file {path} does not exist")
    if not path.is_file():
        raise DecodeInputError(f"image path {path} is not a file")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise DecodeInputError(f"cannot read image file {path}: not a readable image ({msg})") from None


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise DecodeInputError(
            f"prompt must be a non-empty string (a question about the image), got {type(prompt).__name__}"
        )
    if not prompt.strip():
        raise DecodeInputError('the prompt is empty: pass prompt="<a question about the image>"')
    if prompt.count("<image>") > 1:
        raise DecodeInputError("the prompt may contain at most one <image> placeholder (one image per request)")
    return prompt


@contextmanager
def as_decode_input_error(rename: Mapping[str, str] | None = None):
    """Re-raise a broken option rule (:class:`~.configs.InvalidOption`) as :class:`DecodeInputError`.

    ``rename`` maps a rule's field name to the name the user typed (``{"temperature": "bench.temperatures[1]"}``).
    """
    try:
        yield
    except InvalidOption as e:
        raise DecodeInputError(e.message((rename or {}).get(e.name))) from None


def check_int_option(value, name: str, minimum: int, *, allow_none: bool = False, hint: str = "") -> int | None:
    """:func:`~.configs.check_int` for an option the user typed: a broken rule raises :class:`DecodeInputError`."""
    with as_decode_input_error():
        return check_int(value, name, minimum, allow_none=allow_none, hint=hint)


def check_max_new_tokens(n, name: str = "max_new_tokens") -> int:
    return check_int_option(n, name, 1)


def check_seed(seed) -> int | None:
    return check_int_option(seed, "seed", 0, allow_none=True, hint=" or null")


def check_sampling(temperature, top_p, top_k) -> WarpConfig:
    """The :class:`~.configs.WarpConfig` of these values (its rules, raised as :class:`DecodeInputError`)."""
    with as_decode_input_error():
        return WarpConfig(temperature=temperature, top_k=top_k, top_p=top_p)


def check_dtype(dtype, name: str = "dtype") -> str:
    if dtype not in DTYPES:
        raise DecodeInputError(f"{name} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def check_target_dir(target) -> str:
    """The target checkpoint directory as text; unset or missing raises naming the ``target=`` option."""
    if not target:
        raise DecodeInputError("target is not set: pass target=<target checkpoint directory>")
    if not Path(str(target)).expanduser().exists():
        raise DecodeInputError(
            f"target checkpoint directory {target} does not exist; pass target=<dir with "
            f"config.json + model.safetensors + processor>"
        )
    return str(target)


def check_context(prompt_tokens: int, visual_tokens: int, max_new_tokens: int, context: int) -> None:
    """Raise :class:`DecodeInputError` unless the prompt's text and visual tokens plus ``max_new_tokens`` fit the
    target's ``context`` (``text_config.max_position_embeddings``). Past it the positions have no trained meaning:
    the answer silently degenerates, and a huge ``max_new_tokens`` would run on and on."""
    total = prompt_tokens + visual_tokens + max_new_tokens
    if total > context:
        raise DecodeInputError(
            f"the request needs {prompt_tokens} prompt tokens + {visual_tokens} visual tokens + {max_new_tokens} "
            f"max_new_tokens = {total} positions, but the target's context (text_config.max_position_embeddings) is "
            f"{context}: use a shorter prompt, a lower max_new_tokens or a smaller image"
        )


def _tree_from_mapping(tree) -> TreeConfig:
    if not isinstance(tree, Mapping):
        raise DecodeInputError(f"tree must be a mapping with top_k / depth / total_tokens, got {tree!r}")
    valid = list(TreeConfig.__dataclass_fields__)
    unknown = set(tree) - set(valid)
    if unknown:
        raise DecodeInputError(f"unknown tree option(s) {sorted(unknown)}; valid: {', '.join(valid)}")
    with as_decode_input_error():
        return TreeConfig(**tree)


def check_tree(tree) -> dict:
    """Validate a tree config mapping (``top_k``, ``depth``, ``total_tokens`` int or ``"auto"``, ``adaptive``,
    ``clip_to_budget``) against :class:`~.configs.TreeConfig`'s rules; returns it as a dict, as given."""
    if tree is None:
        return {}
    _tree_from_mapping(tree)
    return dict(tree)


@dataclass(frozen=True)
class DecodeRequest:
    """A validated request (see :func:`validate_request`)."""

    image: Any  # PIL.Image (RGB)
    prompt: str
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


def validate_request(
    image, prompt, *, max_new_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=None
) -> DecodeRequest:
    """Check every user input of one request (no model needed); raise :class:`DecodeInputError` on the first
    problem. Order: scalar options first (cheap), then the prompt, then the image file (decoded once here)."""
    n = check_max_new_tokens(max_new_tokens)
    warp = check_sampling(temperature, top_p, top_k)
    s = check_seed(seed)
    q = check_prompt(prompt)
    img = load_image(image)
    return DecodeRequest(img, q, n, warp.temperature, warp.top_p, warp.top_k, s)


# ----------------------------------------------------------------------------------- drafter discovery
def drafter_kind(config: Mapping | None) -> str:
    """``"eaglevlm"`` (no compressor), ``"specvlm"`` (select compressor) or ``"compressor:<type>"``."""
    comp = (config or {}).get("compressor")
    if comp is None:
        return "eaglevlm"
    ctype = comp.get("type") if isinstance(comp, Mapping) else None
    return "specvlm" if ctype == "select" else f"compressor:{ctype}"


def _read_config(path: Path) -> dict | None:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    from ..drafter.base import known_drafter_types  # any registered drafter type (EAGLE-2, EAGLE-3, ...)

    return cfg if isinstance(cfg, dict) and cfg.get("model_type") in known_drafter_types() else None


def find_exported_drafters(root: str | os.PathLike, kind: str = "any") -> list[tuple[Path, dict]]:
    """Exported drafters (``<run dir>/drafter/`` written by ``train.py``) under ``root``, newest first.

    ``kind``: ``"any"``, ``"eaglevlm"`` (config ``compressor`` null) or ``"specvlm"`` (``compressor.type ==
    "select"``). Returns ``(directory, parsed config.json)`` pairs ordered by the export time (mtime of the weights).
    Half-written exports (hidden ``.drafter.tmp-*`` dirs) and directories without weights are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for cfg_file in root.rglob("drafter/config.json"):
        d = cfg_file.parent
        if any(part.startswith(".") for part in d.relative_to(root).parts):
            continue
        weights = d / "model.safetensors"
        if not weights.is_file():
            continue
        cfg = _read_config(cfg_file)
        if cfg is None or (kind != "any" and drafter_kind(cfg) != kind):
            continue
        found.append((weights.stat().st_mtime, d, cfg))
    found.sort(key=lambda x: (x[0], str(x[1])), reverse=True)
    return [(d, cfg) for _, d, cfg in found]


def pick_drafter(candidates: Sequence[tuple[Path, dict]], fingerprint: str | None) -> Path | None:
    """Newest candidate trained for the target with ``fingerprint`` (configs without a fingerprint match any)."""
    for d, cfg in candidates:
        fp = cfg.get("target_fingerprint")
        if fingerprint is None or fp is None or fp == fingerprint:
            return d
    return None


# --------------------------------------------------------------------------------------------- helpers
def hf_sampling_kwargs(temperature: float, top_p: float, top_k: int) -> dict:
    """HF ``generate()`` kwargs with the same warping as :class:`WarpConfig` (top_k / top_p always explicit, since
    HF's own defaults, e.g. ``top_k=50``, would otherwise apply)."""
    if temperature == 0.0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p)}


class ForwardCounter:
    """Counts forward calls of a module and records when the first one finished (context manager).

    Used to count target forwards inside HF ``generate()`` (sigma = new tokens / target forwards) and to time the
    prefill (the first forward) of plain autoregressive decoding.
    """

    def __init__(self, module):
        self.module = module
        self.calls = 0
        self.first_done: float | None = None
        self.started = time.perf_counter()
        self._handle = None

    def _hook(self, module, args, output):
        self.calls += 1
        if self.first_done is None:
            self.first_done = time.perf_counter()

    def reset(self) -> None:
        self.calls, self.first_done = 0, None
        self.started = time.perf_counter()

    def __enter__(self) -> ForwardCounter:
        self.reset()
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@dataclass
class PreparedPrompt:
    """Model inputs of one (image, prompt) pair for a given target + processor."""

    input_ids: Any  # LongTensor [1, T]
    pixel_values: Any  # the family's image inputs (LLaVA-1.5: FloatTensor [1, 3, h, w]; others: VisualInputs)
    n_visual: int
    layouts: list[VisualLayout]  # one per visual (the family's), for the drafter's compressor
    image_size: tuple[int, int]  # (width, height) of the processed image
    original_size: tuple[int, int] | None = None  # (width, height) of the image as given
    downscaled: bool = False  # by the pipeline, to the vision tower's native size (target.image_input_size)

    @property
    def prompt_len(self) -> int:
        return int(self.input_ids.shape[1])

    def image_info(self) -> dict:
        """Sizes for results / logs: as given, as encoded, and whether the pipeline downscaled it."""
        original = self.original_size or self.image_size
        return {"original_size": list(original), "encoded_size": list(self.image_size), "downscaled": self.downscaled}


@dataclass
class DecodeResult:
    """Answer + statistics of one request.

    ``stats`` is a :class:`~specvlm_lit.decoding.speculative.SpecStats`. For ``method == "ar"`` (HF ``generate()``)
    it is filled the same way: ``rounds`` = target forwards, so ``sigma == 1``; ``time_prefill`` = image encoding +
    first forward; ``time_verify`` = the remaining decode steps; draft fields are 0.
    """

    text: str
    tokens: list[int]
    stats: SpecStats
    method: str = "speculative"
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-friendly view (for servers / logs)."""
        s = self.stats.as_dict()
        for k, v in list(s.items()):
            if isinstance(v, float) and not math.isfinite(v):
                s[k] = None
        return {"text": self.text, "tokens": list(self.tokens), "method": self.method, "stats": s, **self.extra}


def format_stats(result: DecodeResult, tree: TreeConfig | None = None) -> str:
    """Human-readable per-request statistics block (what ``decode.py`` prints after the answer)."""
    s = result.stats
    ms = lambda x: f"{1000 * x:.1f} ms"  # noqa: E731
    tps = s.new_tokens / s.time_total if s.time_total > 0 else float("nan")
    end = "EOS" if s.finished_by_eos else "max_new_tokens"
    lines = ["--- statistics ---", f"method: {result.method}"]
    lines.append(f"new tokens: {s.new_tokens} (stopped by {end}); prompt tokens: {s.prompt_len}")
    if result.method == "ar":
        lines.append(f"sigma: {s.sigma:.2f} tokens per target forward ({s.rounds} forwards, plain autoregressive)")
        lines.append(
            f"time: prefill {ms(s.time_prefill)} | decode {ms(s.time_verify)} | total {ms(s.time_total)} "
            f"({tps:.1f} tokens/s)"
        )
        lines.append(f"visual tokens: target {s.target_visual_tokens}, drafter - (no drafter)")
        lines.extend(_image_line(result.extra.get("image")))
    else:
        acc = f"{s.accept_length:.2f}" if s.verify_rounds else "-"
        lines.append(
            f"sigma: {s.sigma:.2f} tokens per target round ({s.rounds} rounds = 1 prefill + "
            f"{s.verify_rounds} verifications; {acc} tokens per verification)"
        )
        lines.append(
            f"time: prefill {ms(s.time_prefill)} | draft {ms(s.time_draft)} | verify {ms(s.time_verify)} | "
            f"other {ms(s.time_other)} | total {ms(s.time_total)} ({tps:.1f} tokens/s)"
        )
        lines.append(f"visual tokens: target {s.target_visual_tokens}, drafter {s.draft_visual_tokens}")
        lines.extend(_image_line(result.extra.get("image")))
        lines.append(f"KV cache: draft {s.draft_kv_len} rows, target {s.target_kv_len} rows")
        if tree is not None:
            lines.append(
                f"tree: top_k {tree.top_k}, depth {tree.depth}, total_tokens {s.total_tokens}"
                + (" (auto)" if tree.auto else "")
            )
    return "\n".join(lines)


def _image_line(info: Mapping | None) -> list[str]:
    """``image: ...`` statistics line: the size encoded and, when it differs, the size given and who resized it."""
    if not info:
        return []
    size = lambda wh: f"{wh[0]}x{wh[1]}"  # noqa: E731
    original, encoded = info["original_size"], info["encoded_size"]
    if info.get("downscaled"):
        how = (
            f"downscaled from {size(original)} (the image processor does not resize: long side fitted to the vision "
            f"tower's native {max(encoded)} px)"
        )
    elif list(original) != list(encoded):
        how = f"resized by the image processor from {size(original)}"
    else:
        how = "as given"
    return [f"image: {size(encoded)} px, {how}"]


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, check_dtype(dtype))


def _tree_config(tree) -> TreeConfig:
    if tree is None:
        return TreeConfig()
    if isinstance(tree, TreeConfig):
        return tree
    return _tree_from_mapping(tree)


# ------------------------------------------------------------------------------------------- pipeline
class SpecVLMPipeline:
    """Target VLM + processor + (optional) EagleVLM / SpecVLM drafter behind a two-method API.

    Args:
        target_path: local HF checkpoint directory of the target (with its processor / tokenizer).
        drafter_path: exported drafter directory (``train.py`` writes ``<run dir>/drafter``); ``None`` = no drafter
            (then :meth:`generate` falls back to plain autoregressive decoding).
        dtype / device: where the target and drafter run.
        tree: :class:`~specvlm_lit.decoding.speculative.TreeConfig` or a mapping with its fields (default: SpecVLM's
            top_k 10, depth 7, total_tokens 60).
    """

    def __init__(self, target_path, drafter_path=None, *, dtype="float32", device="cpu", tree=None):
        from ..drafter.base import load_drafter
        from ..target import TargetAdapter

        tree = _tree_config(tree)
        torch_dtype = _torch_dtype(dtype)
        adapter = TargetAdapter.from_pretrained(target_path, dtype=torch_dtype, device=device)
        # The family's own prompt builder (tokenizer + chat format + image processor), checked against the model.
        processor = adapter.processor
        drafter = None
        if drafter_path is not None:
            drafter = load_drafter(drafter_path, target=adapter, dtype=torch_dtype, device=device)
        self._init(adapter, processor, drafter, tree, checked=True)  # load() already ran check_target
        self.target_path = str(target_path)
        self.drafter_path = None if drafter_path is None else str(drafter_path)

    @classmethod
    def from_components(cls, adapter, processor, drafter=None, *, tree=None) -> SpecVLMPipeline:
        """Wrap already loaded parts (e.g. several drafters sharing one target in a benchmark)."""
        self = cls.__new__(cls)
        self._init(adapter, processor, drafter, _tree_config(tree))
        self.target_path = getattr(adapter.model, "name_or_path", None)
        self.drafter_path = None if drafter is None else getattr(drafter, "name_or_path", None)
        return self

    def _init(self, adapter, processor, drafter, tree, checked: bool = False) -> None:
        if processor is not None and processor is not getattr(adapter, "_processor", None):
            adapter.attach_processor(processor)  # an HF processor of the target: the adapter wraps it
        processor = adapter.processor
        if drafter is not None:
            check = getattr(drafter, "check_target", None)
            if callable(check) and not checked:
                check(adapter)  # DrafterMismatchError for a drafter of another target
            drafter.eval()
        self.adapter = adapter
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.drafter = drafter
        self.tree = tree
        self._decoders: dict = {}
        tok = self.tokenizer
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # ------------------------------------------------------------------------------------------ describe
    @property
    def method(self) -> str:
        """``"ar"`` without drafter, else the drafter kind (``"eaglevlm"``, ``"specvlm"``, ``"compressor:<type>"``)."""
        if self.drafter is None:
            return "ar"
        return drafter_kind({"compressor": getattr(self.drafter.config, "compressor", None)})

    def draft_kv_bytes_per_row(self) -> int:
        """Bytes one draft-KV row takes (K and V of the drafter's single layer)."""
        if self.drafter is None:
            return 0
        c = self.drafter.config
        elem = next(self.drafter.parameters()).element_size()
        return 2 * int(c.num_key_value_heads) * int(c.head_dim) * elem

    # ------------------------------------------------------------------------------------------- inputs
    def prepare(self, image, prompt: str, *, max_new_tokens: int | None = None) -> PreparedPrompt:
        """Image + question -> the target's own prompt (``adapter.render_prompt``: its chat format, each image
        placeholder expanded to the family's visual-token count, the processor outputs the images need). No model
        forward happens here.

        The image goes where the prompt has an ``<image>`` placeholder, else before the question. How it is sized is
        the family's (LLaVA-1.5: a photo larger than the vision tower's native size is downscaled first when the
        processor does not resize, :func:`~specvlm_lit.target.image_input_size`). The prompt must leave room in the
        target's context for ``max_new_tokens`` (at least one new token when not given): :func:`check_context`.
        """
        from ..errors import UserError

        img = load_image(image)
        prompt = check_prompt(prompt)
        if max_new_tokens is not None:
            max_new_tokens = check_max_new_tokens(max_new_tokens)
        before, marker, after = prompt.partition("<image>")
        if marker:
            content = [{"type": "text", "text": before}] if before else []
            content += [{"type": "image", "image": img}] + ([{"type": "text", "text": after}] if after else [])
        else:
            content = [{"type": "image", "image": img}, {"type": "text", "text": prompt}]
        try:
            rendered = self.adapter.render_prompt([{"role": "user", "content": content}])
        except (UserError, ValueError) as e:
            raise DecodeInputError(" ".join(str(e).split())) from None
        original = tuple(img.size)
        given = tuple(rendered.input_sizes[0]) if rendered.input_sizes else original
        encoded = tuple(rendered.encoded_sizes[0]) if rendered.encoded_sizes else given
        inputs = PreparedPrompt(
            rendered.input_ids,
            rendered.visual,
            rendered.num_visual_tokens,
            rendered.layouts,
            encoded,
            original,
            given != original,
        )
        self.check_fits(inputs, 1 if max_new_tokens is None else max_new_tokens)
        return inputs

    def check_fits(self, inputs: PreparedPrompt, max_new_tokens: int) -> None:
        """:func:`check_context` of prepared inputs and ``max_new_tokens`` against this target's context."""
        check_context(inputs.prompt_len - inputs.n_visual, inputs.n_visual, max_new_tokens, self.adapter.context_length)

    def decoder(self, warp):
        """The (cached) :class:`SpeculativeDecoder` for ``warp`` (caching keeps an ``auto`` tree size decision)."""
        from .speculative import SpeculativeDecoder

        if self.drafter is None:
            raise DecodeInputError("this pipeline has no drafter: pass drafter_path=... for speculative decoding")
        dec = self._decoders.get(warp)
        if dec is None:
            dec = self._decoders[warp] = SpeculativeDecoder(self.adapter, self.drafter, self.tree, warp)
        return dec

    def _generator(self, seed):
        import torch

        if seed is None:
            return None
        return torch.Generator(device=self.adapter.device).manual_seed(int(seed))

    def decode(self, inputs: PreparedPrompt, *, max_new_tokens: int, warp, seed=None):
        """Speculative decoding of prepared inputs -> :class:`SpecResult` (image encoding counted in the prefill)."""
        self.check_fits(inputs, max_new_tokens)
        return self.decoder(warp).generate(
            inputs.input_ids,
            pixel_values=inputs.pixel_values,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_token_id,
            generator=self._generator(seed),
            image_layouts=inputs.layouts,
        )

    def hf_generate(
        self, inputs: PreparedPrompt, *, max_new_tokens: int, warp, seed=None, prepare_extra=None, **generate_kwargs
    ):
        """Target ``generate()`` (HF) on prepared inputs: images encoded by the adapter (any resolution) and passed
        as ``mm_encoder_outputs``. Returns ``(new_tokens list, wall seconds, ForwardCounter)``; the wall time covers
        image encoding + ``generate()``. ``prepare_extra()`` (optional) runs inside the timed region and returns
        more ``generate()`` kwargs (the benchmark encodes an assistant's image there)."""
        import torch

        self.check_fits(inputs, max_new_tokens)
        ad = self.adapter
        ids = inputs.input_ids.to(ad.device)
        kwargs = dict(hf_sampling_kwargs(warp.temperature, warp.top_p, warp.top_k))
        kwargs.update(generate_kwargs)
        if seed is not None and kwargs.get("do_sample"):
            torch.manual_seed(int(seed))
        with torch.no_grad(), ForwardCounter(ad.model) as counter:
            t0 = time.perf_counter()
            kwargs.update(ad.hf_generate_inputs(ids, inputs.pixel_values))  # the family's image inputs
            if prepare_extra is not None:
                kwargs.update(prepare_extra())
            out = ad.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                **kwargs,
            )
            if ad.device.type == "cuda":
                torch.cuda.synchronize(ad.device)
            elapsed = time.perf_counter() - t0
        return out[0, ids.shape[1] :].tolist(), elapsed, counter

    # ---------------------------------------------------------------------------------------- public API
    def generate(
        self,
        image,
        prompt: str,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> DecodeResult:
        """Answer ``prompt`` about ``image`` (path or PIL image) with lossless speculative decoding.

        Greedy (``temperature == 0``) output is token-identical to :meth:`generate_ar`; with sampling it is
        distributed exactly like it. ``seed`` makes sampling reproducible. Without a drafter this is
        :meth:`generate_ar`.
        """
        req = validate_request(
            image, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        )
        if self.drafter is None:
            return self._generate_ar(req)
        warp = check_sampling(req.temperature, req.top_p, req.top_k)
        inputs = self.prepare(req.image, req.prompt, max_new_tokens=req.max_new_tokens)
        res = self.decode(inputs, max_new_tokens=req.max_new_tokens, warp=warp, seed=req.seed)
        tokens = res.tokens.tolist()
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return DecodeResult(text, tokens, res.stats, self.method, {"image": inputs.image_info()})

    def generate_ar(self, image, prompt: str, **options) -> DecodeResult:
        """The reference: the target's plain Hugging Face ``generate()`` with the same warping and EOS.

        Takes :meth:`generate`'s keyword options (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``).
        """
        return self._generate_ar(validate_request(image, prompt, **options))

    def _generate_ar(self, req: DecodeRequest) -> DecodeResult:
        from .speculative import SpecStats

        warp = check_sampling(req.temperature, req.top_p, req.top_k)
        inputs = self.prepare(req.image, req.prompt, max_new_tokens=req.max_new_tokens)
        tokens, elapsed, counter = self.hf_generate(inputs, max_new_tokens=req.max_new_tokens, warp=warp, seed=req.seed)
        n = len(tokens)
        first = (counter.first_done - counter.started) if counter.first_done is not None else elapsed
        stats = SpecStats(
            new_tokens=n,
            verify_rounds=max(counter.calls - 1, 0),
            prompt_len=inputs.prompt_len,
            target_visual_tokens=inputs.n_visual,
            target_kv_len=inputs.prompt_len + max(n - 1, 0),
            finished_by_eos=bool(n and tokens[-1] == self.eos_token_id),
            time_prefill=first,
            time_verify=max(elapsed - first, 0.0),
            time_total=elapsed,
        )
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return DecodeResult(text, tokens, stats, "ar", {"image": inputs.image_info()})
