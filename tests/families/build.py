"""Tiny random-weight checkpoints of the real HF classes for every VLM family the adapters support.

Each checkpoint is what a user's download looks like, shrunk: ``config.json`` + ``model.safetensors`` of the real
``*ForConditionalGeneration`` class (vision tower included), the tokenizer files, the checkpoint's own chat template
(``chat_template.jinja``), the image processor's ``preprocessor_config.json`` and, for families whose real repos ship
one, ``video_preprocessor_config.json`` / ``processor_config.json``. Everything is built offline in seconds.

Weights are re-initialised at ``INIT_STD`` (``FAMILY_INIT_STD`` where set; HF's 0.02 makes tiny models repeat one
token whatever the input, which would let identity tests pass trivially); tests check that greedy answers really
depend on the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from . import templates

FAMILIES = ("llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mistral3")
INIT_STD = 0.35
# Mistral 3's prompts are several times longer (its template's default system prompt): at 0.35 HF's own cached vs
# full forward already differ by 1.1e-4 (float32) on the tiny model's layer-1 residual stream (values ~60), over
# the tests' 1e-4; 0.3 keeps that noise at ~5e-5 and the answers image-dependent.
FAMILY_INIT_STD = {"mistral3": 0.3}

# Text the tiny BPE is trained on: the words the tests' prompts use plus some filler.
_CORPUS = [
    "What is shown in the image? Describe the picture. A red square on a blue background.",
    "How many objects are there? There are two cats and one dog. Where is the ball?",
    "Compare both images and answer briefly. The left one is brighter than the right one.",
    "You are a helpful assistant. Thanks! And the colour of the sky? It is grey today.",
]

_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_LLAVA_SPECIALS = ("<unk>", "<s>", "</s>", "<image>", "<video>", "<|im_start|>", "<|im_end|>")
# The first control tokens of the Mistral 3 (tekken) tokenizer, in its order: [IMG] = 10, [IMG_BREAK] = 12,
# [IMG_END] = 13 as in the real one.
_MISTRAL3_SPECIALS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
)


def _bpe(specials: tuple[str, ...], vocab_size: int = 320, corpus: tuple[str, ...] = ()) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((_CORPUS + list(corpus)) * 4, trainer=trainer)
    return tok


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A small byte-level BPE with the family's special tokens, carrying the family's chat template."""
    if family.startswith("qwen"):
        # Like the real Qwen repos: no image_token attribute, the processor's default "<|image_pad|>" applies.
        fast = PreTrainedTokenizerFast(
            tokenizer_object=_bpe(_QWEN_SPECIALS), eos_token="<|im_end|>", pad_token="<|endoftext|>"
        )
        fast.chat_template = templates.QWEN3_VL if family == "qwen3_vl" else templates.QWEN2_VL
    elif family == "mistral3":
        # No image_token attribute (the processor's "[IMG]" default applies). The template's long default system
        # prompt is in the BPE corpus, so it is ~150 tokens (about one per word), not ~600 single bytes.
        fast = PreTrainedTokenizerFast(
            tokenizer_object=_bpe(_MISTRAL3_SPECIALS, MISTRAL3_VOCAB, (templates.MISTRAL3_SYSTEM,)),
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
        )
        # Like the real tokenizer.json: the tokenizer itself prepends BOS, and so does the template.
        bos = fast.convert_tokens_to_ids("<s>")
        fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
        fast.chat_template = templates.MISTRAL3
    else:
        onevision = family == "llava_onevision"
        fast = PreTrainedTokenizerFast(
            tokenizer_object=_bpe(_LLAVA_SPECIALS),
            bos_token=None if onevision else "<s>",
            eos_token="<|im_end|>" if onevision else "</s>",
            pad_token="<unk>",
            extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        )
        fast.chat_template = templates.LLAVA_ONEVISION if onevision else templates.LLAVA_NEXT_MISTRAL
    return fast


def _text(vocab: int, **extra) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        **extra,
    )


# The AnyRes resolutions of the tiny LLaVA families (multiples of the 32 px tile, like 336 for the real ones).
PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
QWEN_PATCH, QWEN_MERGE = 8, 2
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 32 * 32, 96 * 96
# Mistral 3: Pixtral patch and longest edge (real: 14 px, 1540 px), patch merger 2x2 (real: 2).
MISTRAL3_PATCH, MISTRAL3_MERGE, MISTRAL3_LONGEST_EDGE = 4, 2, 64
MISTRAL3_VOCAB = 640  # room for the default system prompt's words (see build_tokenizer)


def _config(family: str, tok: PreTrainedTokenizerFast):
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaOnevisionConfig,
        Mistral3Config,
        MistralConfig,
        PixtralVisionConfig,
        Qwen2_5_VLConfig,
        Qwen2Config,
        Qwen2VLConfig,
        Qwen3VLConfig,
        SiglipVisionConfig,
    )

    vocab = len(tok)
    ids = tok.convert_tokens_to_ids
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    if family == "llava_next":
        return LlavaNextConfig(
            vision_config=CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=32, **vision),
            text_config=MistralConfig(**_text(vocab, sliding_window=None)),
            image_token_id=ids("<image>"),
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    if family == "llava_onevision":
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(image_size=32, patch_size=8, **vision),
            text_config=Qwen2Config(**_text(vocab)),
            image_token_id=ids("<image>"),
            video_token_id=ids("<video>"),
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )
    if family == "mistral3":
        return Mistral3Config(
            vision_config=PixtralVisionConfig(image_size=MISTRAL3_LONGEST_EDGE, patch_size=MISTRAL3_PATCH, **vision),
            text_config=MistralConfig(
                **_text(vocab, sliding_window=None, head_dim=16),
                bos_token_id=ids("<s>"),
                eos_token_id=ids("</s>"),
                pad_token_id=ids("<pad>"),
            ),
            image_token_index=ids("[IMG]"),
            spatial_merge_size=MISTRAL3_MERGE,
            vision_feature_layer=-1,
            projector_hidden_act="gelu",
            multimodal_projector_bias=False,
            tie_word_embeddings=False,
        )
    special = dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    tokens = dict(bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    common_vision = dict(patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=2)
    if family == "qwen2_vl":
        return Qwen2VLConfig(
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, **common_vision),
            text_config=_text(vocab, rope_parameters=rope, **tokens),
            **special,
        )
    if family == "qwen2_5_vl":
        return Qwen2_5_VLConfig(
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                window_size=32,
                out_hidden_size=64,
                fullatt_block_indexes=[1],
                **common_vision,
            ),
            text_config=_text(vocab, rope_parameters=rope, **tokens),
            **special,
        )
    if family == "qwen3_vl":
        return Qwen3VLConfig(
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                num_position_embeddings=64,
                deepstack_visual_indexes=[0],
                **common_vision,
            ),
            text_config=_text(vocab, head_dim=16, rope_parameters={**rope, "mrope_interleaved": True}, **tokens),
            **special,
        )
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


_MODEL_CLASSES = {
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
}


def build_image_processor(family: str):
    """The family's PIL image processor (no torchvision needed), at the tiny model's sizes."""
    import transformers

    if family == "mistral3":
        # patch_size is the tower's (as the real repo saves it): the processor asks for patch x merge multiples.
        return transformers.PixtralImageProcessorPil(
            patch_size=MISTRAL3_PATCH, size={"longest_edge": MISTRAL3_LONGEST_EDGE}
        )
    if family.startswith("qwen"):
        return transformers.Qwen2VLImageProcessorPil(
            patch_size=QWEN_PATCH,
            merge_size=QWEN_MERGE,
            temporal_patch_size=2,
            size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
        )
    cls = (
        transformers.LlavaNextImageProcessorPil
        if family == "llava_next"
        else transformers.LlavaOnevisionImageProcessorPil
    )
    kwargs = dict(image_grid_pinpoints=PINPOINTS, size={"height": 32, "width": 32})
    if family == "llava_next":
        kwargs = dict(image_grid_pinpoints=PINPOINTS, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return cls(**kwargs)


def _processor_config(family: str) -> dict | None:
    """The ``processor_config.json`` the family's real repos ship (the processor's own constructor arguments)."""
    if family == "llava_next":
        return {
            "processor_class": "LlavaNextProcessor",
            "patch_size": 8,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
            "image_token": "<image>",
        }
    if family == "llava_onevision":
        return {
            "processor_class": "LlavaOnevisionProcessor",
            "num_image_tokens": 16,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
            "image_token": "<image>",
            "video_token": "<video>",
        }
    if family == "mistral3":
        return {
            "processor_class": "PixtralProcessor",
            "patch_size": MISTRAL3_PATCH,
            "spatial_merge_size": MISTRAL3_MERGE,
            "image_token": "[IMG]",
            "image_break_token": "[IMG_BREAK]",
            "image_end_token": "[IMG_END]",
        }
    return None


def _video_processor_config(family: str) -> dict | None:
    """What the Qwen repos ship as ``video_preprocessor_config.json`` (loading it needs torchvision)."""
    if not family.startswith("qwen"):
        return None
    cls = "Qwen3VLVideoProcessor" if family == "qwen3_vl" else "Qwen2VLVideoProcessor"
    return {
        "video_processor_type": cls,
        "patch_size": QWEN_PATCH,
        "merge_size": QWEN_MERGE,
        "temporal_patch_size": 2,
        "size": {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
    }


@torch.no_grad()
def _raise_init(model: torch.nn.Module, std: float, seed: int) -> None:
    """Re-draw every matrix (linear, conv, embedding) at ``std``; norms and biases keep HF's init."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif "bias" in name:
            p.zero_()


def build_family(family: str, out: Path, seed: int = 0) -> Path:
    """Write the tiny ``family`` checkpoint to ``out`` (created); returns ``out``."""
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(family)
    config = _config(family, tok)
    torch.manual_seed(seed)
    model = getattr(transformers, _MODEL_CLASSES[family])(config).eval()
    _raise_init(model, FAMILY_INIT_STD.get(family, INIT_STD), seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    template = tok.chat_template
    tok.chat_template = None  # real repos ship it as its own file, not inside tokenizer_config.json
    tok.save_pretrained(out)
    if family in ("qwen2_vl", "mistral3"):  # the older repos' format
        (out / "chat_template.json").write_text(json.dumps({"chat_template": template}), encoding="utf-8")
    else:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    build_image_processor(family).save_pretrained(out)
    if family == "qwen2_5_vl":  # the real repo's key names: min_pixels / max_pixels instead of a size dict
        path = out / "preprocessor_config.json"
        config = json.loads(path.read_text())
        config.pop("size", None)
        config.update(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS, processor_class="Qwen2_5_VLProcessor")
        path.write_text(json.dumps(config, indent=2))
    for name, content in (
        ("processor_config.json", _processor_config(family)),
        ("video_preprocessor_config.json", _video_processor_config(family)),
    ):
        if content is not None:
            (out / name).write_text(json.dumps(content, indent=2), encoding="utf-8")
    return out
