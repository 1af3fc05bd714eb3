"""This project's own autoregressive loop over a :class:`~specvlm_lit.target.TargetAdapter` (batch size 1).

The benchmark's second baseline beside HF ``generate()``. It uses the same adapter, KV cache and kernels as
:class:`~specvlm_lit.decoding.speculative.SpeculativeDecoder` and picks tokens the same way, so that

* "SpecVLM vs own AR" is the gain from speculation alone, and
* "own AR vs HF AR" is the gain (or loss) from a leaner loop: HF ``generate()`` also runs its logits-processor
  chain, stopping criteria and input preparation every step.

The loop::

    encode the image(s), target prefill over the prompt (one forward, cache filled) -> first token
    repeat: one forward of the last token against the cache -> next token, until EOS or max_new_tokens

Greedy output is token-identical to HF ``generate(do_sample=False)``. Sampling draws from
:func:`~specvlm_lit.decoding.acceptance.warp_logits`, the distribution HF ``generate(do_sample=True)`` samples
from (temperature, then top-k, then top-p).
"""

from __future__ import annotations

import time

import torch

from .acceptance import WarpConfig
from .decoder import TargetDecoder, pick_token, sync
from .speculative import SpecResult, SpecStats

__all__ = ["AutoregressiveDecoder", "pick_token"]


class AutoregressiveDecoder(TargetDecoder):
    """Plain one-token-per-forward decoding with the target adapter (see the module doc).

    ``generate`` returns a :class:`~specvlm_lit.decoding.speculative.SpecResult` whose stats follow the AR
    convention of :class:`~specvlm_lit.decoding.pipeline.DecodeResult`: ``rounds`` = target forwards (so
    ``sigma == 1``), ``time_prefill`` = image encoding + prefill + first token, ``time_verify`` = the later steps.
    """

    def __init__(self, adapter, warp: WarpConfig | None = None):
        self.adapter = adapter
        self.warp = warp or WarpConfig()

    def _generate(self, input_ids, image_features, pixel_values, max_new_tokens, eos, generator, t_start):
        eos = set(eos)
        ad = self.adapter
        dev = ad.device
        ids = input_ids.to(dev, torch.long)
        stats = SpecStats(prompt_len=int(ids.shape[1]), target_visual_tokens=int(ad.visual_token_mask(ids).sum()))
        if pixel_values is not None:
            image_features = ad.encode_images(pixel_values)
        cache = ad.new_cache()
        out = ad.forward(ids, image_features=image_features, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tokens = [pick_token(out.logits[0, -1], self.warp, generator)]
        sync(dev)
        t_first = time.perf_counter()
        step = torch.empty((1, 1), dtype=torch.long, device=dev)
        while len(tokens) < max_new_tokens and tokens[-1] not in eos:
            step.fill_(tokens[-1])
            out = ad.forward(step, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tokens.append(pick_token(out.logits[0, -1], self.warp, generator))
        sync(dev)
        t_end = time.perf_counter()

        stats.new_tokens = len(tokens)
        stats.verify_rounds = len(tokens) - 1  # one forward per token after the first (the prefill emits that one)
        stats.finished_by_eos = tokens[-1] in eos
        stats.target_kv_len = cache.get_seq_length()
        stats.time_prefill = t_first - t_start
        stats.time_verify = t_end - t_first
        stats.time_total = t_end - t_start
        return SpecResult(torch.tensor(tokens, dtype=torch.long), stats)
