"""Frozen target-model adapter: one narrow interface over Hugging Face VLMs.

Speculative decoding needs more from the target than ``model(**inputs)``:

* **training** a drafter needs the target's final hidden states and logits for every position, plus the
  target's (frozen) token embedding and LM head, and images at their native *or* other resolutions;
* **decoding** needs a KV-cached *tree* verification pass (many candidate continuations scored in one forward
  with a custom attention mask, :mod:`specvlm_lit.attention_masks`); afterwards the cache is compacted to the
  accepted path by :mod:`specvlm_lit.kv_cache`.

:class:`TargetAdapter` provides exactly that on top of a loaded ``LlavaForConditionalGeneration`` and always
*calls* into transformers (vision tower, projector, decoder layers, attention kernels) rather than re-implementing
them, so numerics stay identical to the HF model. Other VLM families (LLaVA-NeXT, Qwen2-VL, ...) are meant to be
added by subclassing and overriding the small ``_``-prefixed hooks; a subclass registers itself for the
``model_type`` values it lists in :attr:`TargetAdapter.model_types`.

Notes on transformers 5.x behaviour this module relies on (checked against 5.23):

* A **4D** ``attention_mask`` handed to a Llama-style decoder is returned *as is* by
  ``masking_utils.create_causal_mask`` (``_preprocess_mask_arguments`` early-exits on ``len(mask.shape) == 4``),
  so a custom tree mask is not replaced by a causal one. Eager attention *adds* the mask to the scores without
  slicing it, so the mask must be additive (float, 0 / large negative) and exactly ``[B, 1, q_len, past + q_len]``;
  SDPA accepts the same float mask and disables its ``is_causal`` fast path when a mask is present.

The module also owns how an image becomes placeholder tokens (:func:`llava_visual_tokens`,
:func:`llava_visual_grid`, :func:`visual_token_counter`) and how images of mixed sizes are encoded
(:func:`encode_by_size`), so data pipelines and recipes use the same facts before any adapter exists.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import DynamicCache, LlavaForConditionalGeneration, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .attention_masks import prefix_mask
from .config_weights import (
    ShapeFact,
    attention_shape_facts,
    check_integer_fields,
    check_shapes,
    load_pretrained_checked,
)
from .errors import UserError

__all__ = [
    "DecoderStates",
    "TargetAdapter",
    "TargetLoadError",
    "TargetOutput",
    "encode_by_size",
    "fit_long_side",
    "image_input_size",
    "image_list",
    "llava_image_features",
    "llava_visual_grid",
    "llava_visual_tokens",
    "read_model_config",
    "resize_for_target",
    "supported_model_types",
    "visual_token_counter",
]


class TargetLoadError(UserError):
    """A target checkpoint / tokenizer cannot be used. The message names the offending file or value and the fix."""


@dataclass
class TargetOutput:
    """Result of a target forward pass.

    Attributes:
        logits: ``[B, T', V]`` next-token logits. ``T' == T`` unless ``logits_to_keep`` was used, in which case
            they correspond to the kept (last) positions only.
        hidden: ``[B, T, H]`` the *final-norm* hidden state for every input position, i.e. exactly the tensor the
            LM head consumes (``lm_head(hidden[:, -T':]) == logits``). This is the feature EAGLE-style drafters
            regress on.
        past_key_values: the KV cache (updated in place) when caching was requested, else ``None``.
        inputs_embeds: ``[B, T, H]`` the LM inputs the forward used (token embeddings with the visual
            embeddings scattered in), so callers such as drafter training need not embed a second time.
        layer_hidden: one ``[B, T, H]`` tensor per id of the forward's ``hidden_layers``, in that order: id ``i``
            is the residual stream *entering* decoder layer ``i`` (HF ``output_hidden_states[i]``, 0 = the
            embeddings). EAGLE-3 drafters fuse three of them; empty when none were requested.
    """

    logits: torch.Tensor
    hidden: torch.Tensor
    past_key_values: Cache | None = None
    inputs_embeds: torch.Tensor | None = None
    layer_hidden: tuple[torch.Tensor, ...] = ()


@dataclass
class DecoderStates:
    """What :meth:`TargetAdapter._decoder_forward` returns when intermediate layers were requested.

    ``hidden`` is the final-norm hidden state (as the hook returns without ``hidden_layers``); ``layer_hidden`` holds
    one tensor per requested layer id (see :attr:`TargetOutput.layer_hidden`).
    """

    hidden: torch.Tensor
    layer_hidden: tuple[torch.Tensor, ...] = ()


# model_type -> adapter class. Filled by TargetAdapter.__init_subclass__ and the base class below.
_ADAPTERS: dict[str, type[TargetAdapter]] = {}


def supported_model_types() -> list[str]:
    """The ``config.json`` ``model_type`` values that have an adapter."""
    return sorted(_ADAPTERS)


# ------------------------------------------------------------------------------------- visual tokens and images
# How many placeholder tokens an image becomes and how they are laid out is a fact of the target family; these
# functions are its one owner. They work from plain numbers (or the processor), so data pipelines can size prompts
# before any model is loaded; TargetAdapter's methods apply them with the loaded model's config.


def llava_visual_tokens(height: int, width: int, patch_size: int, strategy: str = "default") -> int:
    """Image-placeholder tokens a LLaVA-style tower gives a ``height x width`` image.

    One token per ``patch_size`` patch (the patch conv has stride ``patch_size``, so partial patches are dropped),
    plus the CLS token unless the ``"default"`` select strategy removes it.
    """
    if height < patch_size or width < patch_size:
        raise ValueError(f"Image {height}x{width} is smaller than one {patch_size}x{patch_size} patch.")
    n = (height // patch_size) * (width // patch_size)
    return n if strategy == "default" else n + 1


def llava_visual_grid(height: int, width: int, patch_size: int, strategy: str = "default") -> tuple[int, int] | None:
    """(rows, cols) of the patch grid a LLaVA-style image's tokens are laid out on, row-major; ``None`` when the
    tokens are not a plain grid (a CLS token is kept), so grid-based compressors must not assume one."""
    if strategy != "default":
        return None
    return height // patch_size, width // patch_size


def visual_token_counter(processor) -> Callable[[int, int], int]:
    """``count(height, width)``: image-placeholder tokens per image for the target whose (LLaVA) processor this is.

    Usable before the model is loaded (datamodules size prompts with it). Gives the same numbers as
    :meth:`TargetAdapter.num_visual_tokens` for the processor saved with the checkpoint.
    """
    patch = int(getattr(processor, "patch_size", 0) or 0)
    if patch <= 0:
        raise TargetLoadError(
            f"The processor ({type(processor).__name__}) has no patch_size, so the number of image tokens per image "
            f"is unknown. Use the processor saved with the target checkpoint (AutoProcessor.from_pretrained(<target "
            f"dir>))."
        )
    # LlavaConfig's own default when a processor does not say.
    strategy = getattr(processor, "vision_feature_select_strategy", None) or "default"
    return functools.partial(llava_visual_tokens, patch_size=patch, strategy=strategy)


def fit_long_side(width: int, height: int, limit: int, min_side: int = 1) -> tuple[int, int]:
    """``(width, height)`` downscaled, aspect ratio kept, so the long side is ``limit``; never upscaled.

    The short side stays at least ``min(its size, min_side)`` (one patch), so a very elongated image still gives
    one row of patches instead of none.
    """
    long_side = max(width, height)
    if long_side <= limit:
        return width, height
    scale = limit / long_side
    return (
        max(round(width * scale), min(width, min_side)),
        max(round(height * scale), min(height, min_side)),
    )


def image_input_size(image_processor, vision_config, width: int, height: int) -> tuple[int, int]:
    """The ``(width, height)`` a ``width x height`` image is handed to the target's image processor at.

    An image processor that resizes (LLaVA-1.5's ``CLIPImageProcessor`` with ``do_resize``) is left to do it: the
    size is unchanged. One that does not (the embedded target's keeps each image's own resolution, its tower
    interpolating position embeddings) would give an ordinary photo hundreds of thousands of visual tokens, so an
    image larger than the vision tower's native ``image_size`` is downscaled until its long side is ``image_size``
    (:func:`fit_long_side`, bicubic in :func:`resize_for_target`). Images are never upscaled.
    """
    if getattr(image_processor, "do_resize", False):
        return width, height
    return fit_long_side(width, height, int(vision_config.image_size), int(vision_config.patch_size))


def resize_for_target(image, image_processor, vision_config):
    """``image`` (PIL) at :func:`image_input_size` (bicubic); the same object when no resize is needed."""
    from PIL import Image

    size = image_input_size(image_processor, vision_config, *image.size)
    return image if size == tuple(image.size) else image.resize(size, Image.BICUBIC)


def image_list(pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Images as a flat list of ``[3, h, w]`` tensors, from a ``[B, 3, h, w]`` / ``[3, h, w]`` tensor or a list of
    ``[3, h, w]`` / ``[k, 3, h, w]`` tensors whose sizes may differ."""
    if isinstance(pixel_values, torch.Tensor):
        images = [pixel_values] if pixel_values.dim() == 3 else list(pixel_values)
    else:
        images = []
        for item in pixel_values:
            if item.dim() == 3:
                images.append(item)
            elif item.dim() == 4:
                images.extend(item)
            else:
                raise ValueError(f"Expected image tensors [3,h,w] or [k,3,h,w], got shape {tuple(item.shape)}.")
    for img in images:
        if img.dim() != 3:
            raise ValueError(f"Expected pixel_values [B,3,h,w], got an image of shape {tuple(img.shape)}.")
    return images


def encode_by_size(
    pixel_values: torch.Tensor | Sequence[torch.Tensor],
    encode_batch: Callable[[torch.Tensor], Sequence[torch.Tensor]],
) -> list[torch.Tensor]:
    """Encode images of possibly different sizes, one result per image in input order (see :func:`image_list`).

    Images of equal size are stacked into one ``encode_batch([k, 3, h, w])`` call (a vision tower batches only equal
    sizes), which returns one feature tensor per image. Gradients flow if ``encode_batch`` keeps them.
    """
    images = image_list(pixel_values)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[-2:]), []).append(i)
    features: list[torch.Tensor | None] = [None] * len(images)
    for indices in groups.values():
        for i, feat in zip(indices, encode_batch(torch.stack([images[i] for i in indices]))):
            features[i] = feat
    return features  # type: ignore[return-value]


def llava_image_features(
    model: LlavaForConditionalGeneration, pixel_values: torch.Tensor, *, interpolate_pos_encoding: bool
) -> list[torch.Tensor]:
    """LM-space visual embeddings ``[n, H]`` per image of an equally sized batch ``[B, 3, h, w]`` (tower + projector).

    ``interpolate_pos_encoding`` lets CLIP run on a non-native size by interpolating its learned position table.
    """
    cfg = model.config
    kwargs = {"interpolate_pos_encoding": True} if interpolate_pos_encoding else {}
    out = model.model.get_image_features(
        pixel_values=pixel_values,
        # Passed explicitly: the values must be those of *this* model's config, not whatever defaults a
        # particular transformers version would fill in.
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        **kwargs,
    )
    return list(out.pooler_output)


# ------------------------------------------------------------------------------------------ checkpoint checks
# Weight files that ``PreTrainedModel.from_pretrained`` can read from a local directory, in preference order.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _check_safetensors_file(path: Path) -> dict:
    """Cheaply validate a ``.safetensors`` file without reading the tensor data; return its parsed header.

    The format is ``u64 little-endian header length N`` + ``N bytes JSON header`` + raw tensor bytes, where every
    tensor's ``data_offsets`` are relative to the end of the header. A truncated download/copy is therefore detected
    by comparing the file size with the largest end offset. We check this ourselves because the safetensors reader
    reports it as ``SafetensorError: Error while deserializing header: incomplete metadata``, which does not say
    which file is broken nor how to fix it.
    """
    fix = (
        f"The file is truncated or corrupt (interrupted download or copy?). Re-download the checkpoint, or "
        f"re-create it with `model.save_pretrained('{path.parent}')`."
    )
    size = path.stat().st_size
    if size < 8:
        raise TargetLoadError(f"Weights file {path} is only {size} bytes. {fix}")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise TargetLoadError(
                f"Weights file {path} declares a {header_len}-byte header but the file has only {size} bytes. {fix}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TargetLoadError(f"Weights file {path} has an unreadable safetensors header ({e}). {fix}") from e
    if not isinstance(header, dict):
        raise TargetLoadError(f"Weights file {path} has a malformed safetensors header. {fix}")
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            data_end = max(data_end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as e:
            raise TargetLoadError(f"Weights file {path}: tensor {name!r} has no valid data_offsets. {fix}") from e
    expected = 8 + header_len + data_end
    if size < expected:
        raise TargetLoadError(f"Weights file {path} is {size} bytes but its header describes {expected} bytes. {fix}")
    return header


def header_shapes(header: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (:func:`_check_safetensors_file`)."""
    return {name: tuple(info.get("shape", ())) for name, info in header.items() if name != "__metadata__"}


def read_model_config(config_file: Path, error: type[UserError], *, missing: str, fix: str) -> dict:
    """The parsed ``config.json`` of a saved model, which must name its ``model_type``.

    Raises ``error`` naming the file: ``missing`` is appended when the file does not exist, ``fix`` when it is not
    a JSON object with a ``model_type``.
    """
    if not config_file.is_file():
        raise error(f"{config_file} is missing. {missing}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{config_file} is not valid JSON ({e}). {fix}") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise error(f"{config_file} has no 'model_type' field, so the model family is unknown. {fix}")
    return config


def _check_checkpoint_dir(path: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """Validate a local checkpoint directory; return its parsed ``config.json`` and the weights' tensor shapes
    (read from the safetensors headers; empty for ``pytorch_model.bin`` checkpoints, whose shapes need a load).

    Everything here is checked up front so that the user gets one clear :class:`TargetLoadError` instead of an
    exception from deep inside transformers (which, for a missing local directory, would even try the Hub).
    """
    if not path.exists():
        raise TargetLoadError(
            f"Target checkpoint directory {path} does not exist. Pass the local directory that contains "
            f"config.json and the model weights (download it beforehand; weights are never fetched here)."
        )
    if not path.is_dir():
        raise TargetLoadError(f"Target checkpoint path {path} is not a directory. Pass the checkpoint directory.")

    config = read_model_config(
        path / "config.json",
        TargetLoadError,
        missing="The target directory must be a Hugging Face checkpoint saved with `save_pretrained` "
        "(config.json + model.safetensors).",
        fix="Restore it from the original checkpoint.",
    )

    weights = [name for name in _WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise TargetLoadError(
            f"No model weights in {path}: expected one of {', '.join(_WEIGHT_FILES)}. Copy the weight files next to "
            f"config.json (or re-save the model with `save_pretrained`)."
        )
    shapes: dict[str, tuple[int, ...]] = {}
    if weights[0] == "model.safetensors":
        shapes = header_shapes(_check_safetensors_file(path / "model.safetensors"))
    elif weights[0] == "model.safetensors.index.json":
        index_file = path / "model.safetensors.index.json"
        try:
            shards = sorted(set(json.loads(index_file.read_text(encoding="utf-8"))["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise TargetLoadError(
                f"{index_file} is not a valid sharded-weights index ({e}). Restore it from the original checkpoint."
            ) from e
        for shard in shards:
            shard_path = path / shard
            if not shard_path.is_file():
                raise TargetLoadError(
                    f"Weight shard {shard_path} listed in {index_file} is missing. Download all shards."
                )
            shapes.update(header_shapes(_check_safetensors_file(shard_path)))
    return config, shapes


_LLAVA_TEXT = r"language_model\.(?:model\.)?layers\."
_LLAVA_VISION = r"vision_tower\.(?:vision_model\.)?"


def _llava_head_dim(value) -> int:
    return int(
        value("text_config.head_dim") or value("text_config.hidden_size") // value("text_config.num_attention_heads")
    )


_LLAVA_SHAPE_FACTS = (
    ShapeFact(("text_config.vocab_size",), r"embed_tokens\.weight$", 0),
    ShapeFact(("text_config.hidden_size",), r"embed_tokens\.weight$", 1),
    ShapeFact(("text_config.num_hidden_layers",), _LLAVA_TEXT + r"(\d+)\.", None),
    ShapeFact(("text_config.intermediate_size",), _LLAVA_TEXT + r"0\.mlp\.gate_proj\.weight$", 0),
    *attention_shape_facts(_LLAVA_TEXT + r"0\.", _llava_head_dim, "text_config."),
    ShapeFact(("vision_config.hidden_size",), _LLAVA_VISION + r"embeddings\.patch_embedding\.weight$", 0),
    ShapeFact(("vision_config.num_channels",), _LLAVA_VISION + r"embeddings\.patch_embedding\.weight$", 1),
    ShapeFact(("vision_config.patch_size",), _LLAVA_VISION + r"embeddings\.patch_embedding\.weight$", 2),
    ShapeFact(
        ("vision_config.image_size", "vision_config.patch_size"),
        _LLAVA_VISION + r"embeddings\.position_embedding\.weight$",
        0,
        lambda v: (v("vision_config.image_size") // v("vision_config.patch_size")) ** 2 + 1,
        "(image_size / patch_size)^2 + 1 (CLS)",
    ),
    ShapeFact(("vision_config.intermediate_size",), _LLAVA_VISION + r"encoder\.layers\.0\.mlp\.fc1\.weight$", 0),
    ShapeFact(("vision_config.num_hidden_layers",), _LLAVA_VISION + r"encoder\.layers\.(\d+)\.", None),
)


class TargetAdapter:
    """Frozen target VLM behind the small API used by drafter training and speculative decoding.

    This base class implements LLaVA (``LlavaForConditionalGeneration``: CLIP tower -> 2-layer projector ->
    Llama-style decoder). Subclasses for other families override :attr:`model_types`, :attr:`model_class`,
    :attr:`default_image_token` and the ``_``-prefixed hooks (``_language_model``, ``_encode_same_size``,
    ``_decoder_forward``, ``num_visual_tokens``).

    Everything runs under ``torch.no_grad()`` (not ``inference_mode``: outputs must remain usable as ordinary
    inputs to the drafter's autograd graph during training).
    """

    #: ``config.model_type`` values handled by this class; subclasses register theirs automatically.
    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    #: HF class used by :meth:`from_pretrained`.
    model_class: ClassVar[type[PreTrainedModel]] = LlavaForConditionalGeneration
    #: Token string the family's processor uses as image placeholder (when the tokenizer has no ``image_token``).
    default_image_token: ClassVar[str] = "<image>"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for model_type in cls.__dict__.get("model_types", ()):
            _ADAPTERS[model_type] = cls

    def __init__(self, model: PreTrainedModel, interpolate_pos_encoding: bool = True):
        """Wrap an already loaded HF model.

        Args:
            model: a loaded model of :attr:`model_class`.
            interpolate_pos_encoding: let the vision tower run on images whose size differs from its native
                ``vision_config.image_size`` by interpolating its learned position embeddings (otherwise such
                images raise). This is what lets one target serve variable-resolution inputs.
        """
        if not isinstance(model, self.model_class):
            raise TypeError(
                f"{type(self).__name__} wraps {self.model_class.__name__}, got {type(model).__name__}. "
                f"Supported model types: {', '.join(supported_model_types())}."
            )
        self.model = model
        self.interpolate_pos_encoding = interpolate_pos_encoding
        # The target is frozen: no dropout, no gradients (saves memory and guards against accidental updates
        # when the drafter's optimizer is built from a parent module).
        self.model.eval()
        self.model.requires_grad_(False)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str | None = None,
        interpolate_pos_encoding: bool = True,
    ) -> TargetAdapter:
        """Load a local HF checkpoint directory and wrap it.

        The directory, ``config.json``, ``model_type`` and weight files are validated first so that every
        foreseeable problem raises :class:`TargetLoadError` naming the file and the fix. Loading never touches
        the network (``local_files_only=True``). Weights missing from the checkpoint are an error (transformers
        would silently random-initialise them, which for a frozen target is a silent disaster).

        Args:
            path: local checkpoint directory.
            dtype: parameter dtype (transformers 5 calls this kwarg ``dtype``; ``torch_dtype`` is deprecated).
            device: device to move the model to.
            attn_implementation: optional override, e.g. ``"eager"`` or ``"sdpa"`` (default: transformers' choice).
            interpolate_pos_encoding: see :meth:`__init__`.
        """
        path = Path(path).expanduser()
        config, shapes = _check_checkpoint_dir(path)
        model_type = config["model_type"]
        adapter_cls = _ADAPTERS.get(model_type)
        if adapter_cls is None or not issubclass(adapter_cls, cls):
            raise TargetLoadError(
                f"{path / 'config.json'} has model_type={model_type!r}, which {cls.__name__} does not support "
                f"(supported: {', '.join(supported_model_types())}). Use a supported target or add a "
                f"TargetAdapter subclass for this family."
            )
        adapter_cls.check_config_against_weights(path / "config.json", config, shapes)

        # Every case transformers' load report lists comes back as one line of ours (or the warning below).
        model, info = load_pretrained_checked(
            adapter_cls.model_class,
            path,
            TargetLoadError,
            "Check that the checkpoint is complete, saved by a compatible transformers version, and that "
            "config.json is the original one.",
            dtype=dtype,
            **({} if attn_implementation is None else {"attn_implementation": attn_implementation}),
        )
        unexpected = sorted(info.get("unexpected_keys") or ())
        if unexpected:
            warnings.warn(
                f"{path} holds {len(unexpected)} weight(s) that {adapter_cls.model_class.__name__} does not use "
                f"({', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}); they are ignored.",
                stacklevel=2,
            )
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise TargetLoadError(
                f"Checkpoint {path} lacks {len(missing)} weight(s) of {adapter_cls.model_class.__name__} ({shown}); "
                f"they would be randomly initialised. Use the complete checkpoint for this model_type."
            )
        model.to(device)
        return adapter_cls(model, interpolate_pos_encoding=interpolate_pos_encoding)

    @classmethod
    def shape_facts(cls) -> tuple[ShapeFact, ...]:
        """The sizes in ``config.json`` that this family's weights pin down (family hook; LLaVA here), most basic
        first, so the first mismatch found is the field that was edited. Tensor patterns accept both the names
        transformers 5 saves (``language_model.model.layers``) and its in-memory ones (``model.language_model``)."""
        return _LLAVA_SHAPE_FACTS

    @classmethod
    def check_config_against_weights(cls, config_file: Path, config: dict, shapes: dict) -> None:
        """Raise :class:`TargetLoadError` naming the field when ``config.json`` does not describe the weights' shapes
        (an edited or hand-written config), before transformers builds the model (see :mod:`..config_weights`)."""
        fix = "restore config.json from the original checkpoint."
        facts = cls.shape_facts()
        check_integer_fields(config_file, config, facts, TargetLoadError, fix)
        config_class = cls.model_class.config_class
        try:
            parsed = config_class.from_dict(config)
        except Exception as e:  # noqa: BLE001 - transformers' own validation of a field: re-raised naming the file
            raise TargetLoadError(
                f"{config_file} is not a valid {config_class.__name__} ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]}). Fix the field it names, or {fix}"
            ) from e
        check_shapes(
            config_file,
            config,
            lambda field: functools.reduce(getattr, field.split("."), parsed),
            shapes,
            facts,
            TargetLoadError,
            fix,
        )

    def check_tokenizer(self, tokenizer) -> None:
        """Raise :class:`TargetLoadError` if ``tokenizer`` does not belong to this target.

        Catches the classic mistake of pairing a target with the tokenizer of its base LLM: ids beyond the
        embedding table would index out of range, and a missing/different image token would leave image
        placeholders un-replaced (silently feeding garbage to the drafter).
        """
        fix = "Use the tokenizer saved with the target checkpoint (AutoTokenizer.from_pretrained(<target dir>))."
        n_tok, n_emb = len(tokenizer), self.vocab_size
        if n_tok > n_emb:
            raise TargetLoadError(
                f"Tokenizer has {n_tok} tokens but the target's text embedding has only {n_emb} rows, so some "
                f"token ids would be out of range. {fix}"
            )
        image_token = getattr(tokenizer, "image_token", None) or self.default_image_token
        tok_id = tokenizer.get_vocab().get(image_token)
        if tok_id is None:
            raise TargetLoadError(
                f"Tokenizer lacks the image token {image_token!r} (target config.image_token_id="
                f"{self.image_token_id}). {fix}"
            )
        if tok_id != self.image_token_id:
            raise TargetLoadError(
                f"Tokenizer maps image token {image_token!r} to id {tok_id} but the target expects "
                f"config.image_token_id={self.image_token_id}. {fix}"
            )

    # --------------------------------------------------------------------------------------------- properties
    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Rows of the text embedding (may exceed ``len(tokenizer)`` because of padding to a multiple)."""
        return int(self.embed_tokens.weight.shape[0])

    @property
    def image_token_id(self) -> int:
        cfg = self.config
        token_id = getattr(cfg, "image_token_id", None)
        if token_id is None:  # older configs
            token_id = getattr(cfg, "image_token_index", None)
        return int(token_id)

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """Every placeholder id visual features are scattered into (families with video add the video token)."""
        return (self.image_token_id,)

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` positions that hold a visual placeholder (image or video token)."""
        return torch.isin(input_ids, torch.tensor(self.visual_token_ids, device=input_ids.device))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def embed_tokens(self) -> nn.Embedding:
        """The frozen input token embedding (drafters typically share it)."""
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        """The frozen LM head (drafters typically share it)."""
        return self.model.get_output_embeddings()

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def context_length(self) -> int:
        """Positions the text decoder was built for (``text_config.max_position_embeddings``): prompt, visual and
        generated tokens together must fit in it."""
        return int(self.text_config.max_position_embeddings)

    # ---------------------------------------------------------------------------------------- family hooks
    def _language_model(self) -> nn.Module:
        """The text decoder (without LM head)."""
        return self.model.model.language_model

    def _encode_same_size(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Run tower + projector on a batch of equally sized images ``[B, 3, h, w]``; one ``[n, H]`` per image."""
        vision_cfg = self.config.vision_config
        h, w = pixel_values.shape[-2:]
        native = (h, w) == (vision_cfg.image_size, vision_cfg.image_size)
        if not native and not self.interpolate_pos_encoding:
            raise ValueError(
                f"Image size {h}x{w} differs from the vision tower's native {vision_cfg.image_size}x"
                f"{vision_cfg.image_size}; resize it or construct the adapter with interpolate_pos_encoding=True."
            )
        # CLIP's position embeddings are a learned table for the native patch grid; for another grid they
        # must be (bicubically) interpolated, otherwise the tower refuses the input.
        return llava_image_features(self.model, pixel_values, interpolate_pos_encoding=not native)

    def _decoder_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_key_values: Cache | None,
        use_cache: bool,
        hidden_layers: Sequence[int] = (),
    ) -> torch.Tensor | DecoderStates:
        """Run the HF multimodal model on ready embeddings.

        Returns the final-norm hidden states ``[B, T, H]`` when ``hidden_layers`` is empty, else
        :class:`DecoderStates` with the requested layers' inputs too (:meth:`_decoder_states`). Subclasses that
        override this hook keep the same contract.
        """
        state = {"attention_mask": attention_mask, "position_ids": position_ids, "past_key_values": past_key_values}
        # use_cache explicit: the decoder otherwise defaults to config.use_cache (True).
        out = self.model.model(
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            output_hidden_states=bool(hidden_layers),
            **state,
        )
        return self._decoder_states(out.last_hidden_state, out.hidden_states, hidden_layers)

    def _decoder_states(
        self, last_hidden: torch.Tensor, all_hidden: Sequence[torch.Tensor] | None, hidden_layers: Sequence[int]
    ) -> torch.Tensor | DecoderStates:
        """The hook's return value from an HF output: ``last_hidden`` alone, or with ``all_hidden[i]`` for each
        requested id (HF's ``hidden_states``: index 0 = embeddings, i = input of decoder layer i)."""
        if not hidden_layers:
            return last_hidden
        ids = self._check_hidden_layers(hidden_layers)
        if all_hidden is None or len(all_hidden) < self.num_layers:
            raise RuntimeError(
                f"{type(self).__name__}: the decoder returned no per-layer hidden states (output_hidden_states)"
            )
        return DecoderStates(hidden=last_hidden, layer_hidden=tuple(all_hidden[i] for i in ids))

    def _check_hidden_layers(self, hidden_layers: Sequence[int]) -> tuple[int, ...]:
        ids = tuple(int(i) for i in hidden_layers)
        bad = [i for i in ids if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"hidden_layers {list(ids)}: ids {bad} are out of range; this target has {self.num_layers} decoder "
                f"layers, so ids must be in [0, {self.num_layers - 1}] (id i = the input of decoder layer i)"
            )
        return ids

    def _run_decoder(self, inputs_embeds, hidden_layers: Sequence[int], **kwargs) -> DecoderStates:
        """Call the hook and normalise its result to :class:`DecoderStates` (old-style overrides return a Tensor
        and accept no ``hidden_layers``; they still work when no layers are requested)."""
        if hidden_layers:
            self._check_hidden_layers(hidden_layers)
            if "hidden_layers" not in inspect.signature(self._decoder_forward).parameters:
                raise NotImplementedError(
                    f"{type(self).__name__}._decoder_forward takes no hidden_layers, so it cannot return the target "
                    f"layers an EAGLE-3 drafter reads; add the keyword (see TargetAdapter._decoder_forward)"
                )
            out = self._decoder_forward(inputs_embeds, hidden_layers=tuple(hidden_layers), **kwargs)
            if not isinstance(out, DecoderStates) or len(out.layer_hidden) != len(hidden_layers):
                raise NotImplementedError(
                    f"{type(self).__name__}._decoder_forward does not return the requested hidden_layers; an "
                    f"EAGLE-3 drafter needs them (see DecoderStates)"
                )
            return out
        out = self._decoder_forward(inputs_embeds, **kwargs)
        return out if isinstance(out, DecoderStates) else DecoderStates(hidden=out)

    def num_visual_tokens(self, height: int, width: int) -> int:
        """Number of image-placeholder tokens an image of ``height x width`` pixels expands to
        (:func:`llava_visual_tokens` with this target's patch size and select strategy)."""
        return llava_visual_tokens(
            height, width, int(self.config.vision_config.patch_size), self.config.vision_feature_select_strategy
        )

    def image_input_size(self, image_processor, width: int, height: int) -> tuple[int, int]:
        """(width, height) an image is handed to ``image_processor`` at (:func:`image_input_size` with this
        target's vision config)."""
        return image_input_size(image_processor, self.config.vision_config, width, height)

    def visual_grid(self, height: int, width: int) -> tuple[int, int] | None:
        """(rows, cols) of the patch grid the visual tokens are laid out on, or ``None`` (:func:`llava_visual_grid`
        with this target's patch size and select strategy)."""
        return llava_visual_grid(
            height, width, int(self.config.vision_config.patch_size), self.config.vision_feature_select_strategy
        )

    # ------------------------------------------------------------------------------------------------ prompts
    # The prompt API every family has (specvlm_lit.targets): LLaVA-1.5's Vicuna format is owned by targets/llava.py.
    @property
    def processor(self):
        """This target's prompt builder (``render`` / ``render_conversation``, ``tokenizer``, ``image_processor``),
        loaded on first use from the directory the model was loaded from (:meth:`attach_processor` sets another)."""
        proc = getattr(self, "_processor", None)
        if proc is None:
            from .targets.llava import LlavaPromptProcessor, default_processor_dir

            proc = self._processor = LlavaPromptProcessor.load(default_processor_dir(self), self.config)
            self.check_tokenizer(proc.tokenizer)
        return proc

    def attach_processor(self, processor) -> None:
        """Use ``processor`` (an HF ``LlavaProcessor`` or a prompt builder) for this target's prompts."""
        from .targets.llava import LlavaPromptProcessor

        if not isinstance(processor, LlavaPromptProcessor):
            processor = LlavaPromptProcessor.wrap(processor, self.config)
        self.check_tokenizer(processor.tokenizer)
        self._processor = processor

    def render_prompt(self, messages: Sequence[dict], images: Sequence | None = None):
        """Decoding prompt (:class:`~specvlm_lit.targets.PromptInputs`) in this target's format."""
        return self.processor.render(messages, images, add_generation_prompt=True)

    def render_conversation(self, messages: Sequence[dict], images: Sequence | None = None, max_length=None):
        """Training conversation: ids, pixels and the assistant-only ``loss_mask``."""
        return self.processor.render_conversation(messages, images, max_length=max_length)

    def layouts_of(self, visual) -> list:
        """The visual-token layout (:class:`~specvlm_lit.targets.VisualLayout`) of every image of ``visual``."""
        from .targets.llava import llava_layouts

        return llava_layouts(self.config, visual)

    def hf_generate_inputs(self, input_ids: torch.Tensor, visual) -> dict:
        """The image keyword arguments of HF ``generate()`` for a prompt's ``visual`` (here: the adapter's own
        encoding, any resolution, as ``mm_encoder_outputs``)."""
        if visual is None:
            return {}
        return {"mm_encoder_outputs": self.as_mm_encoder_outputs(self.encode_images(visual))}

    # ------------------------------------------------------------------------------------------------ images
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Encode images into LM-space visual embeddings, one ``[n_i, H]`` tensor per image (input order).

        Accepts a ``[B, 3, h, w]`` tensor or a list of ``[3, h, w]`` / ``[k, 3, h, w]`` tensors whose sizes may
        differ. Images of equal size are batched into a single tower call; sizes other than the tower's native
        one use position-embedding interpolation (see :meth:`__init__`).
        """
        return encode_by_size(
            pixel_values, lambda batch: self._encode_same_size(batch.to(device=self.device, dtype=self.dtype))
        )

    @staticmethod
    def as_mm_encoder_outputs(image_features: Sequence[torch.Tensor]) -> dict[str, BaseModelOutputWithPooling]:
        """Package :meth:`encode_images` output for HF ``model(...)`` / ``generate(mm_encoder_outputs=...)``."""
        return {"image": BaseModelOutputWithPooling(pooler_output=list(image_features))}

    @torch.no_grad()
    def embed(
        self, input_ids: torch.Tensor, image_features: Sequence[torch.Tensor] | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings ``[B, T, H]`` with visual features written into the visual-placeholder positions.

        Features are consumed in row-major order of the placeholders (all of sample 0, then sample 1, ...), the
        same convention as HF's separate image / video scatters. Without ``image_features`` the placeholders keep
        their token embedding (as in HF).
        """
        embeds = self.embed_tokens(input_ids.to(self.device))
        if image_features is None:
            return embeds
        if isinstance(image_features, torch.Tensor):
            image_features = [image_features] if image_features.dim() == 2 else list(image_features)
        if len(image_features) == 0:
            feats = embeds.new_zeros((0, embeds.shape[-1]))
        else:
            feats = torch.cat(list(image_features), dim=0).to(device=embeds.device, dtype=embeds.dtype)
        mask = self.visual_token_mask(input_ids.to(embeds.device))
        n_tokens = int(mask.sum())
        if n_tokens != feats.shape[0]:
            raise ValueError(
                f"Visual tokens and visual features do not match: input_ids contain {n_tokens} visual tokens "
                f"(ids {self.visual_token_ids}) but {feats.shape[0]} feature vectors were given. Render the prompt "
                f"with adapter.render_prompt(...) so each placeholder is expanded to its visual tokens."
            )
        if feats.shape[-1] != embeds.shape[-1]:
            raise ValueError(f"Visual features have width {feats.shape[-1]}, expected hidden size {embeds.shape[-1]}.")
        return embeds.masked_scatter(mask.unsqueeze(-1), feats)

    # ----------------------------------------------------------------------------------------------- forward
    def new_cache(self) -> DynamicCache:
        """An empty ``DynamicCache`` laid out for this model's decoder (one layer object per decoder layer)."""
        return DynamicCache(config=self.text_config)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_features: Sequence[torch.Tensor] | None = None,
        pixel_values: torch.Tensor | Sequence[torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        hidden_layers: Sequence[int] = (),
    ) -> TargetOutput:
        """Full target forward over ``input_ids`` ``[B, T]``.

        Images come either pre-encoded (``image_features``, from :meth:`encode_images`) or as ``pixel_values``
        (encoded here). ``attention_mask`` is the usual 2D ``[B, past + T]`` padding mask (right padding is
        supported; positions default to ``past .. past + T - 1``). With ``use_cache=True`` a new cache is created
        when none is given; the given cache is extended in place.

        ``logits_to_keep``: ``0`` = all positions, ``k > 0`` = last ``k`` positions, or a 1D index tensor.
        ``hidden`` is always returned for every position, and so is ``layer_hidden`` for each id of
        ``hidden_layers`` (see :attr:`TargetOutput.layer_hidden`), from the same forward.
        """
        if image_features is not None and pixel_values is not None:
            raise ValueError("Pass either image_features or pixel_values, not both.")
        if pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        inputs_embeds = self.embed(input_ids, image_features)
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if position_ids is not None:
            position_ids = position_ids.to(self.device)
        states = self._run_decoder(
            inputs_embeds,
            hidden_layers,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        hidden = states.hidden
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            kept = hidden[:, logits_to_keep.to(hidden.device)]
        logits = self.lm_head(kept)
        return TargetOutput(
            logits=logits,
            hidden=hidden,
            past_key_values=past_key_values if use_cache else None,
            inputs_embeds=inputs_embeds,
            layer_hidden=states.layer_hidden,
        )

    __call__ = forward

    @torch.no_grad()
    def tree_forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        tree_mask: torch.Tensor,
        past_key_values: Cache,
        hidden_layers: Sequence[int] = (),
    ) -> TargetOutput:
        """Verify a draft tree in one KV-cached pass.

        Args:
            input_ids: ``[1, n]`` tree node tokens (any topological order, typically BFS).
            position_ids: ``[1, n]`` absolute positions (``prefix_len + depth`` of each node).
            tree_mask: ``[n, n]`` bool ancestor-or-self mask: ``tree_mask[i, j]`` iff node ``j`` is node ``i`` or
                one of its ancestors.
            past_key_values: cache holding the accepted prefix; the ``n`` node entries are appended to it (use
                :func:`specvlm_lit.kv_cache.compact` afterwards to keep only the accepted path).

        Returns logits/hidden (and ``layer_hidden`` for ``hidden_layers``) for every node, i.e. node ``i``'s
        prediction for the token after it given its root-to-node path.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"tree_forward expects input_ids of shape [1, n], got {tuple(input_ids.shape)}.")
        n = input_ids.shape[1]
        if tuple(position_ids.shape) != (1, n):
            raise ValueError(f"position_ids must have shape [1, {n}], got {tuple(position_ids.shape)}.")
        if tuple(tree_mask.shape) != (n, n):
            raise ValueError(f"tree_mask must have shape [{n}, {n}], got {tuple(tree_mask.shape)}.")
        if not bool(torch.diagonal(tree_mask.to(torch.bool)).all()):
            raise ValueError("tree_mask must be ancestor-or-self: every node must attend to itself (diagonal True).")
        if past_key_values is None:
            raise ValueError(
                "tree_forward needs a cache holding the prefix (use new_cache() + forward(use_cache=True))."
            )
        # Every node sees the whole cached prefix and its own ancestors. A 4D mask is taken verbatim by
        # transformers' create_causal_mask (no causal mask is built on top).
        mask = prefix_mask(tree_mask, past_key_values.get_seq_length(), self.dtype, self.device)
        states = self._run_decoder(
            self.embed_tokens(input_ids.to(self.device)),
            hidden_layers,
            attention_mask=mask,
            position_ids=position_ids.to(self.device),
            past_key_values=past_key_values,
            use_cache=True,
        )
        return TargetOutput(
            logits=self.lm_head(states.hidden),
            hidden=states.hidden,
            past_key_values=past_key_values,
            layer_hidden=states.layer_hidden,
        )

    # ------------------------------------------------------------------------------------------- fingerprint
    @torch.no_grad()
    def fingerprint(self) -> str:
        """Short stable id of this target, stored with drafters so a drafter is never paired with another target.

        Hashes the architecture facts a drafter depends on (model_type, hidden size, vocab size, layers, image
        token id) and the embedding / LM-head weights it shares. Weights are hashed as bfloat16 on CPU so the id is
        the same whether the target is loaded in fp32 or bf16 and on any device; for large vocabularies an evenly
        spaced subset of <= 4096 rows is hashed, which keeps this fast while still changing for any real
        retraining. Weights not shared with the drafter (decoder layers, vision tower) are not covered.
        """
        h = hashlib.sha256()
        meta = {
            "model_type": self.config.model_type,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "num_layers": self.num_layers,
            "image_token_id": self.image_token_id,
        }
        h.update(json.dumps(meta, sort_keys=True).encode())
        for weight in (self.embed_tokens.weight, self.lm_head.weight):
            h.update(str(tuple(weight.shape)).encode())
            rows = weight.shape[0]
            if rows > 4096:
                idx = torch.linspace(0, rows - 1, 4096, device=weight.device).round().long()
                weight = weight.index_select(0, idx)
            h.update(weight.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_type={self.config.model_type!r}, hidden_size={self.hidden_size}, "
            f"vocab_size={self.vocab_size}, num_layers={self.num_layers}, dtype={self.dtype}, device={self.device})"
        )


for _model_type in TargetAdapter.model_types:
    _ADAPTERS[_model_type] = TargetAdapter

from . import targets as _targets  # noqa: E402,F401 - registers the family adapters (LLaVA-NeXT, Qwen-VL, ...)
