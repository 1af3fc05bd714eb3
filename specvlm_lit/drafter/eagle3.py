"""EAGLE-3 drafter for VLMs: fused low/mid/high target features, a first layer over ``cat(norm(e), norm(h))``, its
own LM head over an optional pruned draft vocabulary.

Architecture (as EAGLE-3, SpecForge's ``LlamaForCausalLMEagle3`` and vLLM's EAGLE-3 head, so that an export maps onto
their weights one to one, see :mod:`specvlm_lit.export`):

* features ``f_t = fc(cat(a_{l1}(t), a_{l2}(t), a_{l3}(t)))`` where ``a_l`` is the residual stream *entering* target
  decoder layer ``l`` (``TargetOutput.layer_hidden``; default layers ``[2, L/2, L-3]`` as in EAGLE-3), ``fc`` without
  bias; the visual compressor (if any) runs on these H-wide rows exactly as for EAGLE-2;
* ``layers.0``: ``x = cat(input_layernorm(e_{t+1}), hidden_norm(f_t))`` (2H wide) feeds q/k/v; the residual is
  ``f_t`` (``norm_before_residual = false``, the SpecForge convention; always written to exports); o_proj, then a
  Llama MLP block. Further layers (``num_hidden_layers > 1``) are plain ``LlamaDecoderLayer`` s;
* ``hidden`` (the pre-norm layer output) is what deeper draft steps take as their feature; logits are
  ``lm_head(norm(hidden))`` over ``draft_vocab_size`` tokens (``d2t`` / ``t2d`` buffers when pruned, see
  :mod:`.vocab`). No feature regression: training is logit distillation with training-time test.

The token embedding stays the target's (shared and frozen, as in EAGLE-2); ``image_rows`` says what the token side
of image rows holds (the target's visual embeddings, or the image placeholder's token embedding as vLLM's Llama
EAGLE-3 wrapper and SpecForge/speculators training feed it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from ..config_weights import ShapeFact, attention_shape_facts
from ..target import TargetAdapter
from .base import IMAGE_ROWS, DrafterOutput, DraftModel, register_drafter
from .compressor import Compressor, build_compressor
from .eagle import EagleVLMConfig, _drafter_head_dim, _target_final_norm_weight, draft_attention_mask, draft_positions
from .vocab import d2t_t2d

__all__ = ["Eagle3VLMConfig", "Eagle3VLMDrafter", "default_hidden_layers"]


def default_hidden_layers(num_layers: int) -> list[int]:
    """EAGLE-3's low / middle / high target layers ``[2, L // 2, L - 3]`` (``L >= 6``); for shallower targets the
    first, middle and last layer ``[0, L // 2, L - 1]`` (distinct from ``L = 3`` on, as serving formats require)."""
    n = int(num_layers)
    ids = (2, n // 2, n - 3) if n >= 6 else (0, n // 2, n - 1)
    return [min(max(i, 0), n - 1) for i in ids]


class Eagle3VLMConfig(EagleVLMConfig):
    """Configuration of :class:`Eagle3VLMDrafter` (the :class:`EagleVLMConfig` fields plus the ones below).

    ``hidden_layers``: target layer ids whose inputs are fused (``None`` = :func:`default_hidden_layers` of
    ``target_num_layers``). ``draft_vocab_size``: rows of the drafter's own head (``None`` = the target vocabulary).
    ``image_rows``: ``"visual"`` or ``"placeholder"`` (module docstring). ``num_hidden_layers``: draft decoder
    layers. ``final_norm`` is always on (the head reads ``norm(hidden)``). ``init_head_from_target``: start the
    head and final norm as the target's (its LM-head rows of the draft vocabulary and its final-norm weight, see
    :meth:`Eagle3VLMDrafter.for_target`); ``False`` keeps them at the random / unit initialisation.
    """

    model_type = "eagle3_vlm"

    hidden_layers: list[int] | None = None
    target_num_layers: int | None = None
    draft_vocab_size: int | None = None
    image_rows: str = "visual"
    num_hidden_layers: int = 1
    norm_before_residual: bool = False
    init_head_from_target: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.image_rows not in IMAGE_ROWS:
            raise ValueError(f"image_rows must be one of {list(IMAGE_ROWS)}, got {self.image_rows!r}")
        if self.hidden_layers is None and self.target_num_layers:
            self.hidden_layers = default_hidden_layers(self.target_num_layers)
        if self.hidden_layers is not None:
            self.hidden_layers = [int(i) for i in self.hidden_layers]
            n = self.target_num_layers
            if not self.hidden_layers or any(i < 0 or (n and i >= n) for i in self.hidden_layers):
                raise ValueError(
                    f"hidden_layers must be a non-empty list of target layer ids in [0, {n - 1 if n else 'L-1'}], "
                    f"got {self.hidden_layers}"
                )
        if self.vocab_size is not None and self.draft_vocab_size is not None:
            if not 1 <= int(self.draft_vocab_size) <= int(self.vocab_size):
                raise ValueError(
                    f"draft_vocab_size must be in [1, {self.vocab_size}] (the target vocabulary), "
                    f"got {self.draft_vocab_size}"
                )
        if int(self.num_hidden_layers) < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        self.final_norm = True

    @classmethod
    def from_target(cls, source, **overrides) -> Eagle3VLMConfig:
        text_config = getattr(source, "text_config", None)
        if text_config is None and hasattr(source, "get_text_config"):
            text_config = source.get_text_config(decoder=True)
        overrides.setdefault("target_num_layers", int(text_config.num_hidden_layers))
        for key in ("hidden_layers", "draft_vocab_size"):
            if key in overrides and overrides[key] is None:
                overrides.pop(key)
        return super().from_target(source, **overrides)

    def num_draft_layers(self) -> int:
        return int(self.num_hidden_layers)

    @property
    def head_size(self) -> int:
        return int(self.draft_vocab_size or self.vocab_size)


class Eagle3FirstLayer(nn.Module):
    """EAGLE-3's first draft layer: attention over ``cat(input_layernorm(e), hidden_norm(h))`` (2H wide q/k/v, an
    H-wide o_proj), residual ``h`` (or ``hidden_norm(h)`` with ``norm_before_residual``), then a Llama MLP block.
    Built from transformers' ``LlamaAttention`` / ``LlamaMLP`` with the q/k/v projections widened."""

    def __init__(self, llama_config, norm_before_residual: bool):
        super().__init__()
        h, eps = llama_config.hidden_size, llama_config.rms_norm_eps
        self.norm_before_residual = norm_before_residual
        self.input_layernorm = LlamaRMSNorm(h, eps=eps)
        self.hidden_norm = LlamaRMSNorm(h, eps=eps)
        self.self_attn = LlamaAttention(llama_config, layer_idx=0)
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(self.self_attn, name)
            setattr(self.self_attn, name, nn.Linear(2 * h, old.out_features, bias=False))
        self.post_attention_layernorm = LlamaRMSNorm(h, eps=eps)
        self.mlp = LlamaMLP(llama_config)

    def forward(self, embeds, hidden, *, attention_mask, past_key_values, position_embeddings):
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        attn, _ = self.self_attn(
            hidden_states=x,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_embeddings=position_embeddings,
        )
        hidden = residual + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


@register_drafter
class Eagle3VLMDrafter(DraftModel):
    """EAGLE-3 drafter (module docstring). Protocol: :class:`~specvlm_lit.drafter.base.DraftModel`."""

    config_class = Eagle3VLMConfig
    config: Eagle3VLMConfig
    feature_regression = False
    config_keys = (
        "hidden_layers",
        "draft_vocab_size",
        "image_rows",
        "num_hidden_layers",
        "intermediate_size",
        "init_head_from_target",
    )
    supports_gradient_checkpointing = False
    _no_split_modules = ["LlamaDecoderLayer", "Eagle3FirstLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False  # tree drafting needs arbitrary 4D float masks
    _supports_flex_attn = False
    _supports_attention_backend = True

    def __init__(self, config: Eagle3VLMConfig):
        super().__init__(config)
        if config.hidden_layers is None:
            raise ValueError("Eagle3VLMConfig.hidden_layers is unset: build the config with from_target(target)")
        h, eps = config.hidden_size, config.rms_norm_eps
        self._llama_config = config.to_llama_config()
        self.fc = nn.Linear(len(config.hidden_layers) * h, h, bias=False)
        layers: list[nn.Module] = [Eagle3FirstLayer(self._llama_config, config.norm_before_residual)]
        layers += [LlamaDecoderLayer(self._llama_config, layer_idx=i) for i in range(1, config.num_hidden_layers)]
        self.layers = nn.ModuleList(layers)
        self.rotary_emb = LlamaRotaryEmbedding(config=self._llama_config)
        self.norm = LlamaRMSNorm(h, eps=eps)
        self.lm_head = nn.Linear(h, config.head_size, bias=False)
        if config.draft_vocab_size is not None and config.draft_vocab_size < (config.vocab_size or 0):
            # Placeholder mapping (the first Vd ids) until set_draft_vocab / loading fills the real one.
            # (d2t = 0: draft id i is target id i; built without data-dependent checks, as it may be on "meta").
            t2d = torch.zeros(int(config.vocab_size), dtype=torch.bool)
            t2d[: config.draft_vocab_size] = True
            self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
            self.register_buffer("t2d", t2d)
        else:
            self.d2t = self.t2d = None
        self.compressor: Compressor | None = build_compressor(config.compressor, h)
        self.post_init()

    # --------------------------------------------------------------------------------------------- protocol
    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return tuple(self.config.hidden_layers)

    def project_features(self, target_output) -> torch.Tensor:
        layer_hidden = target_output.layer_hidden
        if len(layer_hidden) != len(self.config.hidden_layers):
            raise ValueError(
                f"the EAGLE-3 drafter reads target layers {self.config.hidden_layers}: run the target with "
                f"hidden_layers=drafter.hidden_layers (got {len(layer_hidden)} layer states)"
            )
        x = torch.cat([a.to(self.fc.weight.dtype) for a in layer_hidden], dim=-1)
        return self.fc(x.to(self.fc.weight.device))

    @property
    def draft_vocab(self) -> torch.Tensor | None:
        if self.d2t is None:
            return None
        return torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    def head_logits(self, hidden: torch.Tensor, target: TargetAdapter | None = None) -> torch.Tensor:
        return self.lm_head(self.norm(hidden.to(self.lm_head.weight.dtype)))

    @torch.no_grad()
    def set_draft_vocab(self, token_ids: Sequence[int] | torch.Tensor, target: TargetAdapter | None = None) -> None:
        """Use the ascending target ids ``token_ids`` as the draft vocabulary; with ``target`` (and
        ``config.init_head_from_target``), re-initialise the head from the target LM head's rows of those tokens (the
        natural start: the target's own predictions)."""
        if self.d2t is None:
            raise ValueError("this drafter has the full target vocabulary (draft_vocab_size unset)")
        ids = torch.as_tensor(token_ids, dtype=torch.long).cpu()
        if ids.numel() != self.d2t.numel():
            raise ValueError(f"expected {self.d2t.numel()} draft token ids, got {ids.numel()}")
        d2t, t2d = d2t_t2d(ids, int(self.config.vocab_size))
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)
        if target is not None and self.config.init_head_from_target:
            self._init_head_from_target(target)

    @torch.no_grad()
    def _init_head_from_target(self, target: TargetAdapter) -> None:
        weight = getattr(target.lm_head, "weight", None)
        if weight is None or weight.shape[1] != self.lm_head.weight.shape[1]:
            return
        vocab = self.draft_vocab
        rows = weight if vocab is None else weight[vocab.to(weight.device)]
        self.lm_head.weight.copy_(rows.to(self.lm_head.weight))
        norm_weight = _target_final_norm_weight(target)
        if norm_weight is not None and norm_weight.shape == self.norm.weight.shape:
            self.norm.weight.copy_(norm_weight.to(self.norm.weight))

    @classmethod
    def for_target(cls, target: TargetAdapter, **config_overrides) -> Eagle3VLMDrafter:
        """A fresh drafter for ``target``; its head and final norm start as the target's (rows of the draft
        vocabulary), so the untrained drafter already predicts with the target's own head (unless
        ``init_head_from_target=False``)."""
        model = cls(cls.config_class.from_target(target, **config_overrides))
        if model.config.init_head_from_target:
            model._init_head_from_target(target)
        return model

    # ------------------------------------------------------------------------------------------------ forward
    def new_cache(self) -> DynamicCache:
        """An empty ``DynamicCache`` with one layer object per draft layer."""
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
        """Draft forward over ``T`` new rows; arguments as :meth:`EagleVLMDrafter.forward` (``features`` are
        :meth:`project_features` rows or, deeper in a draft, this drafter's own ``hidden``)."""
        if token_embeds.dim() != 3 or token_embeds.shape != features.shape:
            raise ValueError(
                f"token_embeds and features must both be [B, T, H], got {tuple(token_embeds.shape)} and "
                f"{tuple(features.shape)}"
            )
        b, t, h = token_embeds.shape
        if h != self.config.hidden_size:
            raise ValueError(f"rows have width {h} but the drafter's hidden size is {self.config.hidden_size}")
        if self._llama_config._attn_implementation != self.config._attn_implementation:
            self._llama_config._attn_implementation = self.config._attn_implementation
        dtype = self.fc.weight.dtype
        embeds, hidden = token_embeds.to(dtype), features.to(dtype)
        if past_key_values is None and use_cache:
            past_key_values = self.new_cache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = draft_positions(position_ids, past_len, b, t, hidden.device)
        mask = draft_attention_mask(self._llama_config, attention_mask, hidden, past_key_values, past_len)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        hidden = self.layers[0](
            embeds,
            hidden,
            attention_mask=mask,
            past_key_values=past_key_values,
            position_embeddings=position_embeddings,
        )
        for layer in self.layers[1:]:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=past_key_values is not None,
                position_embeddings=position_embeddings,
            )
        return DrafterOutput(hidden=hidden, past_key_values=past_key_values)


# The sizes of config.json the weights pin down (see specvlm_lit.config_weights), most basic first.
Eagle3VLMDrafter.shape_facts = (
    ShapeFact(("hidden_size",), r"^norm\.weight$", 0),
    ShapeFact(("intermediate_size",), r"^layers\.0\.mlp\.gate_proj\.weight$", 0),
    *attention_shape_facts(r"^layers\.0\.", _drafter_head_dim, kv_heads_nullable=True),
    ShapeFact(
        ("vocab_size",),  # draft_vocab_size may be null (= vocab_size), so it cannot be the integer-checked field
        r"^lm_head\.weight$",
        0,
        lambda v: v("draft_vocab_size") or v("vocab_size"),
        "draft_vocab_size (or vocab_size)",
    ),
    ShapeFact(("num_hidden_layers",), r"^layers\.(\d+)\.", None),
)
