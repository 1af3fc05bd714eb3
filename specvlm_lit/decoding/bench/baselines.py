"""The Hugging Face baselines: plain ``generate()`` (AR), prompt lookup and assisted decoding.

How the two accelerated baselines are run (transformers 5.23, checked in its sources):

* Prompt lookup (``prompt_lookup_num_tokens=N``): on a LLaVA prompt "USER: <image>... ASSISTANT:" the n-gram
  search falls back to the 1-gram ":" which matches "USER:" and proposes the *image placeholder tokens* that follow
  it. HF verifies prompt + candidates in its first forward together with ``mm_encoder_outputs`` and the LLaVA
  forward fails ("Image features and image tokens do not match"). HF's candidate filter drops candidates that the
  logits processors forbid, so we pass ``suppress_tokens=[image_token_id]`` (``prompt_lookup_suppress_image_token``):
  the target can then never emit the image placeholder, which a target never does in an answer anyway; whether the
  outputs stayed identical to AR is measured, not assumed. Sampling (T > 0) works: HF samples the target token at
  each candidate position and keeps the matching prefix (exact for a deterministic draft).
* Assisted decoding (``assistant_model=``): HF copies the target's model kwargs to the assistant, but the
  assistant's ``generate()`` runs its prefill with ``is_first_iteration=False``, which drops every multimodal input
  (``mm_encoder_outputs``, ``pixel_values``): the assistant VLM would draft blind, its image placeholders embedded as
  the plain ``<image>`` token. (``pixel_values`` would also only work at the vision tower's native resolution, since
  LLaVA's forward does not interpolate position embeddings.) We therefore give the assistant its OWN image features:
  its image is encoded by its own tower (position embeddings interpolated, so every resolution works) inside the
  timed region, and a forward pre-hook on the assistant's multimodal model inserts them as ``mm_encoder_outputs``
  into the call that holds the prompt's image placeholders. HF's assistant settings are left at their defaults
  (recorded in bench.json); the assistant must share the target's tokenizer.
"""

from __future__ import annotations

from typing import Any

from ...target import resize_for_target
from ..pipeline import DecodeInputError
from .settings import BenchSettings

__all__ = ["Assistant", "load_assistant", "run_hf_method"]


class Assistant:
    """A small LLaVA assistant for HF assisted decoding that sees its OWN image features (see the module doc)."""

    def __init__(self, path: str, pipe, dtype, device):
        from transformers import AutoProcessor

        from ...target import TargetAdapter

        self.path = path
        self.adapter = TargetAdapter.from_pretrained(path, dtype=dtype, device=device)
        ad, tok = pipe.adapter, pipe.tokenizer
        try:
            proc = AutoProcessor.from_pretrained(path, local_files_only=True)
        except Exception:  # noqa: BLE001 - no processor saved: the target's image processor is used
            proc = None
        self.image_processor = getattr(proc, "image_processor", None) or pipe.processor.image_processor
        a_tok = getattr(proc, "tokenizer", None)
        fix = "use an assistant trained with the target's tokenizer (same vocabulary and image token)"
        if self.adapter.vocab_size != ad.vocab_size or self.adapter.image_token_id != ad.image_token_id:
            raise DecodeInputError(
                f"bench.assistant {path} does not share the target's tokenizer (vocab {self.adapter.vocab_size} vs "
                f"{ad.vocab_size}, image token {self.adapter.image_token_id} vs {ad.image_token_id}): {fix}"
            )
        if a_tok is not None and a_tok.get_vocab() != tok.get_vocab():
            raise DecodeInputError(f"bench.assistant {path} has a different tokenizer vocabulary: {fix}")
        self.model = self.adapter.model
        gc = self.model.generation_config
        try:  # what HF's AssistedCandidateGenerator falls back to when the assistant's config leaves them unset
            defaults = gc._get_default_generation_params()
        except Exception:  # noqa: BLE001 - private helper; only used for reporting
            defaults = {}
        self.generation_defaults = {
            k: getattr(gc, k, None) if getattr(gc, k, None) is not None else defaults.get(k)
            for k in ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
        }
        self._feats = None
        self._n = 0
        self.injected = 0
        self.kv_len = 0
        self.model.model.register_forward_pre_hook(self._inject, with_kwargs=True)
        self.model.register_forward_hook(self._track)

    def pixels(self, image):
        # The size the target is fed (target.py's rule), so both models see the same image.
        image = resize_for_target(image, self.image_processor, self.adapter.config.vision_config)
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"]

    def encode(self, pixel_values) -> None:
        self._feats = self.adapter.encode_images(pixel_values)
        self._n = sum(int(f.shape[0]) for f in self._feats)
        self.injected = 0
        self.kv_len = 0

    @property
    def visual_tokens(self) -> int:
        """Image features encoded for the current prompt (what the assistant sees once injected)."""
        return self._n

    def kv_bytes_per_row(self) -> int:
        """Bytes one row of the assistant's KV cache takes (K and V of every layer)."""
        c = self.model.config.get_text_config()
        heads = int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        return 2 * int(c.num_hidden_layers) * heads * head_dim * self.adapter.embed_tokens.weight.element_size()

    def _inject(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if self._feats is None or ids is None or kwargs.get("pixel_values") is not None:
            return None
        if int((ids == self.adapter.image_token_id).sum()) == self._n and self._n > 0:
            kwargs["mm_encoder_outputs"] = self.adapter.as_mm_encoder_outputs(self._feats)
            self.injected += 1
            return args, kwargs
        return None

    def _track(self, module, args, output):
        pkv = getattr(output, "past_key_values", None)
        if pkv is not None:
            self.kv_len = max(self.kv_len, int(pkv.get_seq_length()))


def load_assistant(s: BenchSettings, pipe) -> tuple[Assistant | None, str | None]:
    """``(assistant, None)``, or ``(None, why the assisted row is skipped)``. A configured assistant that does not
    fit the target is an error, unless ``bench.assistant=auto`` picked it."""
    if s.assistant is None:
        return None, (
            "no assistant: set bench.assistant=<dir of a small LLaVA that shares the target's tokenizer>, "
            "or build the embedded one: "
            "python -m recipes.embedded_target.build --config-name assistant_recipe"
        )
    try:
        return Assistant(s.assistant, pipe, pipe.adapter.dtype, s.device), None
    except DecodeInputError as e:
        if not s.assistant_auto:
            raise
        return None, f"the embedded assistant does not fit this target: {e}"


def run_hf_method(
    method: str, pipe, s: BenchSettings, assistant: Assistant | None, inputs, a_pixels, warp, seed, *, ttft: bool
) -> dict:
    """One timed HF ``generate()`` run of ``method`` (``ar`` / ``prompt_lookup`` / ``assisted``) -> its record.

    ``ttft``: also time a separate ``max_new_tokens=1`` call on the same input (image encoding + prefill).
    """
    kwargs: dict[str, Any] = {}
    extra = None
    if method == "prompt_lookup":
        kwargs["prompt_lookup_num_tokens"] = s.prompt_lookup_num_tokens
        if s.prompt_lookup_suppress_image_token:
            kwargs["suppress_tokens"] = [pipe.adapter.image_token_id]
    elif method == "assisted":

        def extra():
            assistant.encode(a_pixels)
            return {"assistant_model": assistant.model}

    tokens, elapsed, counter = pipe.hf_generate(
        inputs, max_new_tokens=s.max_new_tokens, warp=warp, seed=seed, prepare_extra=extra, **kwargs
    )
    n = len(tokens)
    rec: dict[str, Any] = {"tokens": tokens, "new_tokens": n, "target_forwards": counter.calls, "time_s": elapsed}
    if method == "ar":
        rec.update(drafter_visual_tokens=None, draft_kv=None, draft_kv_bytes=None)
    elif method == "prompt_lookup":
        rec.update(drafter_visual_tokens=0, draft_kv=0, draft_kv_bytes=0)  # an n-gram lookup: no model, no KV
    else:
        rec.update(
            drafter_visual_tokens=assistant.visual_tokens if assistant.injected else 0,
            draft_kv=assistant.kv_len,
            draft_kv_bytes=assistant.kv_len * assistant.kv_bytes_per_row(),
            assistant_saw_image=bool(assistant.injected),
        )
    if ttft:
        _, t1, _ = pipe.hf_generate(inputs, max_new_tokens=1, warp=warp, seed=seed, prepare_extra=extra, **kwargs)
        rec["ttft_s"] = t1
    return rec
