"""EagleVLM drafter: one Llama decoder layer over ``fc([norm_e(e_{t+1}), norm_f(f_t)])``.

The drafter is a ``PreTrainedModel`` (``save_pretrained`` / ``from_pretrained`` with safetensors) that *wraps*
transformers' own Llama building blocks (``LlamaDecoderLayer``, ``LlamaRotaryEmbedding``, ``LlamaRMSNorm``, the
attention interface and ``masking_utils.create_causal_mask``) instead of re-implementing them, so attention kernels,
RoPE variants and cache handling behave exactly as in the target family.

What it does NOT contain: the token embedding and the LM head. They belong to the frozen target and are shared
(SpecVLM / EAGLE): the caller embeds tokens with ``TargetAdapter.embed_tokens`` (or passes visual embeddings), and
turns the drafter's ``hidden`` into logits with ``TargetAdapter.lm_head``. Keeping them out of the drafter keeps the
checkpoint small and makes it impossible to train or save a stale copy of them; :meth:`EagleVLMDrafter.check_target`
(and the target fingerprint stored in the config) guards against pairing a drafter with the wrong target.

Row semantics follow :mod:`specvlm_lit.drafter.sequence`: row t consumes (e_{t+1}, f_t) and ``hidden[t]`` predicts
the target's final feature f_{t+1}; ``lm_head(hidden[t])`` is the draft distribution of x_{t+2}.

Notes on transformers 5.23 this module relies on (checked in the installed sources):

* ``LlamaDecoderLayer.forward(hidden, attention_mask, position_ids, past_key_values, use_cache,
  position_embeddings)`` takes the rotary ``(cos, sin)`` precomputed by ``LlamaRotaryEmbedding(x, position_ids)``
  (there is no ``cache_position`` any more); its attention writes K/V to ``past_key_values`` at the layer index it
  was built with, so the layer is built with ``layer_idx=0`` and the draft cache is a one-layer ``DynamicCache``.
* ``create_causal_mask`` returns a 4D mask unchanged, and builds a causal (+ 2D padding) mask sized from the cache
  otherwise. We never hand it ``position_ids``: without a cache and mask it would use them to detect "packed
  sequences" (position resets) and silently block attention across them; our causality is by row index.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, PreTrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from ..attention_masks import as_additive
from ..config_weights import ShapeFact, attention_shape_facts
from ..target import TargetAdapter
from .base import (
    DrafterLoadError,
    DrafterMismatchError,
    DrafterOutput,
    DraftModel,
    check_export_path,
    register_drafter,
    save_atomically,
)
from .compressor import Compressor, build_compressor, normalize_compressor_config

__all__ = [
    "DrafterLoadError",
    "DrafterMismatchError",
    "DrafterOutput",
    "EagleVLMConfig",
    "EagleVLMDrafter",
    "check_export_path",
    "save_atomically",
]


# Fields copied from the target's text config by EagleVLMConfig.from_target.
_ARCH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "max_position_embeddings",
    "initializer_range",
    "vocab_size",
)


class EagleVLMConfig(PreTrainedConfig):
    """Configuration of :class:`EagleVLMDrafter`.

    Sizes of the single decoder layer follow the target LM (:meth:`from_target`); ``hidden_size`` MUST equal the
    target's (the drafter consumes target features and its output feeds the target's LM head). ``vocab_size`` is
    the target's vocabulary, only used by :meth:`EagleVLMDrafter.check_target`. RoPE is given as transformers 5
    ``rope_parameters`` (``{"rope_type": "default", "rope_theta": 10000.0}``); a legacy ``rope_theta=`` keyword is
    converted by the base class.

    ``compressor`` is the visual compressor's plain-dict config (see
    :func:`specvlm_lit.drafter.compressor.build_compressor`; ``None`` = EagleVLM baseline, all visual rows). It is
    validated and canonicalised here, so a bad config fails when the config is created, not mid-training.

    ``final_norm``: apply an RMSNorm to the layer output. The regression target f_{t+1} is the target's *final-norm*
    feature (what the LM head consumes), so ending with a (learnable) RMSNorm puts the prediction on the same
    normalised scale; EAGLE-1 has no such norm, EAGLE-3 does.
    """

    model_type = "eagle_vlm"

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    vocab_size: int | None = None
    final_norm: bool = True
    target_fingerprint: str | None = None
    target_name_or_path: str | None = None
    compressor: dict | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)  # also turns a legacy rope_theta / rope_scaling kwarg into rope_parameters
        self.compressor = normalize_compressor_config(self.compressor, self.hidden_size)

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_target(cls, source: Any, **overrides) -> EagleVLMConfig:
        """Config whose decoder layer has the target LM's sizes.

        ``source`` is a :class:`~specvlm_lit.target.TargetAdapter` (also records its vocabulary size, fingerprint
        and checkpoint path) or a (text or multimodal) HF config. ``overrides`` set any field (e.g.
        ``compressor={...}``, ``intermediate_size=...``); an override of an architecture field with value ``None``
        means "keep the target's" (so a Hydra ``intermediate_size: null`` works). ``hidden_size`` cannot differ from
        the target's.
        """
        fingerprint = name = None
        if isinstance(source, TargetAdapter) or (hasattr(source, "text_config") and hasattr(source, "fingerprint")):
            text_config = source.text_config
            vocab_size = int(source.vocab_size)
            fingerprint = source.fingerprint()
            name = getattr(source.config, "_name_or_path", None) or None
        elif isinstance(source, PreTrainedConfig):
            text_config = source.get_text_config(decoder=True)
            vocab_size = getattr(text_config, "vocab_size", None)
            name = getattr(source, "_name_or_path", None) or None
        else:
            raise TypeError(
                f"from_target expects a TargetAdapter or a transformers config, got {type(source).__name__}"
            )

        tc = text_config
        kwargs: dict[str, Any] = {
            "hidden_size": int(tc.hidden_size),
            "intermediate_size": int(tc.intermediate_size),
            "num_attention_heads": int(tc.num_attention_heads),
            "num_key_value_heads": int(getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads),
            "head_dim": int(getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads),
            "hidden_act": getattr(tc, "hidden_act", "silu"),
            "rms_norm_eps": float(getattr(tc, "rms_norm_eps", 1e-6)),
            "rope_parameters": _global_rope_parameters(getattr(tc, "rope_parameters", None)),
            "max_position_embeddings": int(getattr(tc, "max_position_embeddings", 4096)),
            "initializer_range": float(getattr(tc, "initializer_range", 0.02)),
            "vocab_size": vocab_size,
            "target_fingerprint": fingerprint,
            "target_name_or_path": name,
        }
        for key, value in overrides.items():
            if key in _ARCH_KEYS and value is None:
                continue
            if key == "hidden_size" and value != kwargs["hidden_size"]:
                raise ValueError(
                    f"the drafter's hidden size must equal the target's ({kwargs['hidden_size']}), got {value}: it "
                    f"consumes the target's features and its output feeds the target's LM head"
                )
            kwargs[key] = value
        if kwargs["rope_parameters"] is None:
            kwargs.pop("rope_parameters")
        return cls(**kwargs)

    def num_draft_layers(self) -> int:
        """Decoder layers of the drafter (one for EagleVLM)."""
        return 1

    def to_llama_config(self) -> LlamaConfig:
        """The one-layer ``LlamaConfig`` the wrapped ``LlamaDecoderLayer`` / rotary embedding / cache are built from."""
        cfg = LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_draft_layers(),
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=copy.deepcopy(self.rope_parameters),
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
            attention_dropout=self.attention_dropout,
            vocab_size=self.vocab_size or 1,  # unused: the drafter has no embedding table
            attention_bias=False,
            mlp_bias=False,
        )
        cfg._attn_implementation = self._attn_implementation
        return cfg


def _global_rope_parameters(rope: dict | None) -> dict | None:
    """The target's RoPE parameters for full-attention layers (flat dict), or None. Multimodal-RoPE keys (Qwen-VL's
    ``mrope_section`` / ``mrope_interleaved``) are dropped: the drafter's rotary is 1-D (docs/training.md, "Drafter
    positions"), and a Llama rotary warns about keys it does not know."""
    if not rope:
        return None
    if "rope_type" in rope or "rope_theta" in rope:
        flat = dict(rope)
    else:
        nested = rope.get("full_attention") or next((v for v in rope.values() if isinstance(v, dict)), None)
        if not nested:
            return None
        flat = dict(nested)
    return copy.deepcopy({k: v for k, v in flat.items() if not k.startswith("mrope")})


@register_drafter
class EagleVLMDrafter(DraftModel):
    """EAGLE-style single-layer drafter for VLMs (SpecVLM's EagleVLM), optionally with a visual compressor.

    Per row: ``x = fc([norm_e(e), norm_f(f)])`` -> ``LlamaDecoderLayer`` (pre-norm attention + SwiGLU MLP, both
    with residuals) -> optional final RMSNorm -> ``hidden``.

    Input normalisation (SpecVLM adds "an input layer normalization" without saying where): two *separate*
    RMSNorms, one per half, before ``fc``. Token embeddings (std ~0.02 for text tokens; projector outputs for visual
    tokens, often 10-100x larger) and final-norm target features (RMS ~ the final norm's weights) live on very
    different scales; one norm over the concatenation would let the larger half dominate ``fc`` and the gradient,
    while per-half, per-row normalisation gives both halves unit RMS (learnable gains keep the balance trainable)
    and also equalises text vs. visual embedding rows. The decoder layer's own ``input_layernorm`` then normalises
    ``fc``'s output before attention (EAGLE-1 had dropped that norm for its single layer; we keep the HF layer as is).

    ``self.compressor`` (built from ``config.compressor``) is a submodule so one ``save_pretrained`` directory holds
    drafter + compressor; it is *called by* :func:`~specvlm_lit.drafter.sequence.build_draft_sequence`, not by
    :meth:`forward`, which sees already-assembled rows.
    """

    config_class = EagleVLMConfig
    config: EagleVLMConfig
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False  # tree verification needs arbitrary 4D float masks
    _supports_flex_attn = False
    _supports_attention_backend = True

    def __init__(self, config: EagleVLMConfig):
        super().__init__(config)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.norm_embeds = LlamaRMSNorm(h, eps=eps)
        self.norm_features = LlamaRMSNorm(h, eps=eps)
        self.fc = nn.Linear(2 * h, h, bias=True)
        self._llama_config = config.to_llama_config()
        self.layer = LlamaDecoderLayer(self._llama_config, layer_idx=0)
        self.rotary_emb = LlamaRotaryEmbedding(config=self._llama_config)
        self.norm = LlamaRMSNorm(h, eps=eps) if config.final_norm else None
        self.compressor: Compressor | None = build_compressor(config.compressor, h)
        self.post_init()

    # ------------------------------------------------------------------------------------------------ forward
    def new_cache(self) -> DynamicCache:
        """An empty one-layer ``DynamicCache`` for the draft KV cache."""
        return DynamicCache(config=self._llama_config)

    def forward(
        self,
        token_embeds: torch.Tensor,
        features: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
    ) -> DrafterOutput:
        """Draft forward over ``T`` new rows.

        Args:
            token_embeds: ``[B, T, H]`` e_{t+1} (target input embeddings, visual embeddings for image rows).
            features: ``[B, T, H]`` f_t (target final features, or the drafter's own predictions when unrolling).
            position_ids: ``[B, T]`` RoPE positions; default ``past_len + arange(T)``.
            attention_mask: ``None`` = causal over cache + new rows; 2D ``[B, past + T]`` padding mask (1 = real)
                combined with causality; or a 4D ``[B or 1, 1, T, past + T]`` mask used as is: additive float
                (0 allowed, ``finfo.min`` blocked, see :mod:`specvlm_lit.attention_masks`) or bool (True = allowed).
            past_key_values: draft cache (from :meth:`new_cache`); it is extended in place with the T rows.
            use_cache: create a new cache when none is given (a given cache is always extended).
        """
        if token_embeds.dim() != 3 or token_embeds.shape != features.shape:
            raise ValueError(
                f"token_embeds and features must both be [B, T, H], got {tuple(token_embeds.shape)} and "
                f"{tuple(features.shape)}"
            )
        b, t, h = token_embeds.shape
        if h != self.config.hidden_size:
            raise ValueError(f"rows have width {h} but the drafter's hidden size is {self.config.hidden_size}")
        # Keep the wrapped layer's config in sync after set_attn_implementation() on the drafter.
        if self._llama_config._attn_implementation != self.config._attn_implementation:
            self._llama_config._attn_implementation = self.config._attn_implementation

        dtype = self.fc.weight.dtype
        e = self.norm_embeds(token_embeds.to(dtype))
        f = self.norm_features(features.to(dtype))
        hidden = self.fc(torch.cat([e, f], dim=-1))

        if past_key_values is None and use_cache:
            past_key_values = self.new_cache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = draft_positions(position_ids, past_len, b, t, hidden.device)

        mask = self._prepare_mask(attention_mask, hidden, past_key_values, past_len)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        hidden = self.layer(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=past_key_values is not None,
            position_embeddings=position_embeddings,
        )
        if self.norm is not None:
            hidden = self.norm(hidden)
        return DrafterOutput(hidden=hidden, past_key_values=past_key_values)

    def _prepare_mask(self, attention_mask, hidden, past_key_values, past_len):
        return draft_attention_mask(self._llama_config, attention_mask, hidden, past_key_values, past_len)

    @classmethod
    def for_target(cls, target: TargetAdapter, **config_overrides) -> EagleVLMDrafter:
        """A freshly initialised drafter for ``target`` (``EagleVLMConfig.from_target`` + overrides).

        With ``final_norm`` the final RMSNorm's gain starts as a copy of the target's final-norm weight when the
        target exposes one: the drafter regresses onto that norm's outputs, so this is the natural starting scale.
        """
        model = cls(EagleVLMConfig.from_target(target, **config_overrides))
        norm_weight = _target_final_norm_weight(target)
        if model.norm is not None and norm_weight is not None and norm_weight.shape == model.norm.weight.shape:
            with torch.no_grad():
                model.norm.weight.copy_(norm_weight.to(model.norm.weight))
        return model


def draft_positions(position_ids, past_len: int, b: int, t: int, device) -> torch.Tensor:
    """RoPE positions of ``T`` new draft rows: the given ``[B or 1, T]`` ones, else ``past_len + arange(T)``."""
    if position_ids is None:
        return torch.arange(past_len, past_len + t, device=device).expand(b, t)
    if tuple(position_ids.shape) not in ((b, t), (1, t)):
        raise ValueError(f"position_ids must be [{b}, {t}], got {tuple(position_ids.shape)}")
    return position_ids.to(device)


def draft_attention_mask(llama_config, attention_mask, hidden, past_key_values, past_len):
    """The mask a draft layer gets for ``T`` new rows after ``past_len`` cached ones (see ``forward``'s
    ``attention_mask``): a 4D mask checked and made additive, else causal (+ 2D padding) via transformers."""
    b, t = hidden.shape[:2]
    kv = past_len + t
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.shape[0] not in (1, b) or tuple(attention_mask.shape[1:]) != (1, t, kv):
            raise ValueError(
                f"4D attention_mask must be [{b} or 1, 1, {t}, {kv}] (past {past_len} + {t} new), got "
                f"{tuple(attention_mask.shape)}"
            )
        return as_additive(attention_mask.to(hidden.device), hidden.dtype)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (b, kv):
            raise ValueError(
                f"2D attention_mask must be [{b}, {kv}] (past {past_len} + {t} new), got {tuple(attention_mask.shape)}"
            )
        attention_mask = attention_mask.to(hidden.device)
    # position_ids deliberately not passed: see the module docstring (packed-sequence detection).
    return create_causal_mask(
        config=llama_config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        past_key_values=past_key_values,
    )


def _target_final_norm_weight(target: TargetAdapter) -> torch.Tensor | None:
    try:
        norm = target._language_model().norm
    except AttributeError:
        return None
    return getattr(norm, "weight", None)


def _drafter_head_dim(value) -> int:
    return int(value("head_dim") or value("hidden_size") // value("num_attention_heads"))


# The sizes of config.json the weights pin down (see specvlm_lit.config_weights), most basic first.
_DRAFTER_FACTS = (
    ShapeFact(("hidden_size",), r"^norm_embeds\.weight$", 0),
    ShapeFact(("intermediate_size",), r"^layer\.mlp\.gate_proj\.weight$", 0),
    *attention_shape_facts(r"^layer\.", _drafter_head_dim, kv_heads_nullable=True),
)

EagleVLMDrafter.shape_facts = _DRAFTER_FACTS
