"""What every decoder of a :class:`~specvlm_lit.target.TargetAdapter` shares (batch size 1).

:class:`TargetDecoder.generate` checks a request once, for every decoder, and hands it to the subclass's
``_generate``; :func:`pick_token` is the one rule for turning next-token logits into the token ``generate()`` emits
(argmax, or a sample of the warped law), so the speculative decoder's first token and the plain AR loop's tokens
come from the same code.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from .acceptance import WarpConfig, warp_logits


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a phase's wall time is its own (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eos_list(eos_token_id) -> list[int]:
    """``eos_token_id`` as HF ``generate()`` takes it (None, an int, a list or a tensor of ints) -> a list of ids."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    if isinstance(eos_token_id, bool):
        raise ValueError(f"eos_token_id must be an int, a list of ints or None, got {eos_token_id!r}")
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    try:
        ids = list(eos_token_id)
    except TypeError:
        raise ValueError(f"eos_token_id must be an int, a list of ints or None, got {eos_token_id!r}") from None
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"eos_token_id must be an int, a list of ints or None, got {eos_token_id!r}")
    return ids


def pick_token(logits: Tensor, warp: WarpConfig, generator: torch.Generator | None = None) -> int:
    """The token ``generate()`` emits from next-token ``logits [V]``: the argmax, or a sample of the warped law."""
    if warp.greedy:
        return int(logits.argmax(-1))
    probs = warp_logits(logits, warp)
    if generator is not None:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


def check_generate_inputs(
    adapter, input_ids, image_features, pixel_values, max_new_tokens, eos_token_id, generator
) -> tuple[list[int], list[Tensor] | None]:
    """Validate one request; returns ``(eos ids, image_features as a list or None)``. Raises ``ValueError``."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(input_ids, Tensor):
        raise ValueError(f"input_ids must be a LongTensor of shape [1, T], got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape [1, T] (batch size 1, no padding), got {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: the prompt needs at least one token")
    vocab = adapter.vocab_size
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"input_ids contain ids outside [0, {vocab}) (min {lo}, max {hi})")
    eos = eos_list(eos_token_id)
    if image_features is not None and pixel_values is not None:
        raise ValueError("Pass either image_features or pixel_values, not both.")
    if image_features is not None:
        if isinstance(image_features, Tensor):
            image_features = [image_features] if image_features.dim() == 2 else list(image_features)
        n_feat = sum(int(f.shape[0]) for f in image_features)
        n_tok = int(adapter.visual_token_mask(input_ids).sum())
        if n_feat != n_tok:
            raise ValueError(
                f"input_ids contain {n_tok} visual tokens but image_features hold {n_feat} vectors; expand each "
                f"image placeholder to its number of visual tokens."
            )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return eos, image_features


class TargetDecoder:
    """Base of the decoders: ``generate`` checks the request, then the subclass's ``_generate`` decodes it.

    Subclasses set ``self.adapter`` and ``self.warp`` and implement ``_generate(input_ids, image_features,
    pixel_values, max_new_tokens, eos, generator, t_start, **options)``; ``options`` are their own keyword-only
    extras (``image_layouts`` for the speculative decoder). ``_modules_in_eval`` lists modules that may be training
    between calls (the drafter during validation): they decode in eval mode and are restored afterwards.
    """

    adapter = None
    warp: WarpConfig

    def _modules_in_eval(self) -> Sequence[torch.nn.Module]:
        return ()

    # inference_mode rather than no_grad: no version counters or view tracking on the many small tensors of a round
    # (tests/test_speculative.py also decodes under an outer inference_mode).
    @torch.inference_mode()
    def generate(
        self,
        input_ids: Tensor,
        image_features: Sequence[Tensor] | None = None,
        pixel_values: Tensor | Sequence[Tensor] | None = None,
        *,
        max_new_tokens: int,
        eos_token_id: int | Iterable[int] | None = None,
        generator: torch.Generator | None = None,
        **options,
    ):
        """Up to ``max_new_tokens`` tokens after ``input_ids [1, T]``; stops right after the first EOS (kept), exactly
        like HF ``generate()``. Images come pre-encoded (``image_features``, from ``adapter.encode_images``) or as
        ``pixel_values`` (encoded inside the timed prefill). ``generator`` drives all sampling randomness
        (``None`` = torch's global RNG). Returns a :class:`~specvlm_lit.decoding.speculative.SpecResult`."""
        t_start = time.perf_counter()
        eos, image_features = check_generate_inputs(
            self.adapter, input_ids, image_features, pixel_values, max_new_tokens, eos_token_id, generator
        )
        training = [m for m in self._modules_in_eval() if getattr(m, "training", False)]
        for m in training:
            m.eval()
        try:
            return self._generate(
                input_ids, image_features, pixel_values, max_new_tokens, eos, generator, t_start, **options
            )
        finally:
            for m in training:
                m.train()

    def _generate(self, input_ids, image_features, pixel_values, max_new_tokens, eos, generator, t_start, **options):
        raise NotImplementedError  # pragma: no cover - abstract
