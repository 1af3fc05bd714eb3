"""Lossless speculative decoding of several requests at once (batch size B >= 1, greedy).

One round drafts a tree for every request with one batched drafter forward per tree level, verifies all trees in
ONE target forward over ``[B, n]`` tree nodes, accepts per row (each row its own number of tokens) and compacts
every row's caches to its own accepted path. Rows that finish (EOS or ``max_new_tokens``) leave the batch at once,
so later rounds only pay for the requests still running. Every row's output is token-identical to that request
decoded alone by Hugging Face ``generate()`` (tests/test_batched.py).

Cache layout: left padding for the prompts, per-row write pointers afterwards
-----------------------------------------------------------------------------
Both caches (target and drafter) are ordinary batched ``DynamicCache`` objects, ``[B, heads, L, head_dim]`` per
layer, with ``L`` common to the batch. A row's entries are described by two facts:

* **prompt padding**: prompts are left-padded to the longest one (``pad [B, P]``, True = real entry). Pad entries
  are never attended to; a pad query only sees itself, so its (unused) outputs stay finite;
* **write pointer** ``length[b]``: every slot from ``length[b]`` on is free for row ``b``.

A row's valid slots are therefore ``pad[b]`` for the prompt slots and ``P <= j < length[b]`` after them, and
``L = max_b length[b]``. A round appends the same number of entries to every row at the end of the cache (tree
nodes to the target, tree rows or accepted rows to the drafter), then :func:`~specvlm_lit.kv_cache.compact_rows`
moves each row's kept entries to its own write pointer and cuts the cache to the new ``L``. The entries in between
(``length[b] <= j < L`` for rows shorter than the longest) are stale and masked. Positions are per row: a target
entry's position is the number of real tokens before it, a draft row's its index among the row's real draft rows,
exactly as at batch size 1 (:mod:`.speculative`), so every row attends to exactly what it would alone.

Sampling
--------
``temperature > 0`` is refused at batch size > 1 (:class:`BatchSamplingError`): the per-row acceptance rule would
be the batch-1 one, but its distribution has not been tested in batched form, and this project does not ship an
untested sampler. Adaptive trees (``tree.adaptive``) are refused too: their per-round decisions are per request.
Decode such requests with :class:`~.speculative.SpeculativeDecoder` one at a time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import kv_cache
from ..drafter.sequence import build_draft_sequence
from ..errors import UserError
from ..targets.inputs import EncodedImages, VisualLayout
from .acceptance import WarpConfig, greedy_paths, truncate_at_eos
from .configs import TreeConfig
from .decoder import check_generate_inputs, sync
from .speculative import PhaseTimes, SpeculativeDecoder, prompt_layouts
from .tree import BatchedTreeBuilder

__all__ = ["BatchSamplingError", "BatchedResult", "BatchedSpeculativeDecoder", "BatchedStats"]


class BatchSamplingError(UserError):
    """A batched decoder was asked for something only the batch-1 decoder does (sampling, adaptive trees)."""


@dataclass
class BatchedStats(PhaseTimes):
    """Counters and timings of one :meth:`BatchedSpeculativeDecoder.generate` call.

    ``rounds`` = batched verification forwards; ``active_per_round`` = rows still decoding in each; per row:
    ``new_tokens``, ``verify_rounds`` (rounds it took part in) and ``finished_by_eos``. Times as in
    :class:`~.speculative.SpecStats`, for the whole batch.
    """

    batch_size: int = 0
    new_tokens: list[int] = field(default_factory=list)
    verify_rounds: list[int] = field(default_factory=list)
    finished_by_eos: list[bool] = field(default_factory=list)
    rounds: int = 0
    active_per_round: list[int] = field(default_factory=list)
    tree_sizes: list[int] = field(default_factory=list)  # nodes per row (root included), per round
    total_tokens: int = 0

    @property
    def sigma(self) -> list[float]:
        """Per row: new tokens / target forwards that emitted them (its prefill + its verifications)."""
        return [n / (r + 1) if n else 0.0 for n, r in zip(self.new_tokens, self.verify_rounds)]

    def as_dict(self) -> dict:
        d = self._fields_dict()
        d["sigma"] = self.sigma
        return d


@dataclass
class BatchedResult:
    tokens: list[Tensor]  # per request: LongTensor [n_b] new tokens, on CPU
    stats: BatchedStats


class _Rows:
    """Bookkeeping of one batched cache (see the module doc): prompt padding ``pad [B, P]`` and write pointers."""

    def __init__(self, pad: Tensor):
        self.pad = pad
        self.length = [pad.shape[1]] * pad.shape[0]

    @property
    def width(self) -> int:
        return max(self.length)

    def valid(self) -> Tensor:
        """``[B, L]`` True where row ``b`` has a real entry."""
        p, width = self.pad.shape[1], self.width
        after = (
            torch.arange(p, width, device=self.pad.device)[None]
            < torch.tensor(self.length, device=self.pad.device)[:, None]
        )
        return torch.cat([self.pad, after], 1)

    def select(self, keep: list[int]) -> None:
        self.pad = self.pad[keep]
        self.length = [self.length[i] for i in keep]

    def append(self, cache, start: int, kept: list[list[int]]) -> None:
        """Row ``b`` keeps the appended entries ``start + kept[b][j]``, moved to its write pointer; cut the rest."""
        rows, src, dst = [], [], []
        for b, entries in enumerate(kept):
            for j, e in enumerate(entries):
                if start + e != self.length[b] + j:
                    rows.append(b)
                    src.append(start + e)
                    dst.append(self.length[b] + j)
            self.length[b] += len(entries)
        as_t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        kv_cache.compact_rows(cache, as_t(rows), as_t(src), as_t(dst), self.width)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _prefill_mask(pad: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, 1, P, P]`` additive: causal over the real entries of left-padded rows; a pad row sees only itself."""
    p = pad.shape[1]
    causal = torch.ones(p, p, dtype=torch.bool, device=pad.device).tril()
    allowed = causal[None] & pad[:, None, :]
    allowed |= torch.eye(p, dtype=torch.bool, device=pad.device)[None]
    return _additive(allowed, dtype)[:, None]


class BatchedSpeculativeDecoder(SpeculativeDecoder):
    """Greedy EAGLE-2 tree speculative decoding of ``B`` requests at once (see the module doc).

    Same arguments as :class:`~.speculative.SpeculativeDecoder`; ``warp`` must be greedy and ``tree.adaptive``
    false (:class:`BatchSamplingError` otherwise). ``debug_hook(event, info)`` is called with ``"tree"`` (the
    round's batched tree tokens and parents, and the request of every row) and ``"round"`` (caches, their row
    bookkeeping and the real entries per row, after the round); read, don't modify. The drafter must accept
    batched rows (``[B, T, H]``) with a 4D mask of batch ``B``, as :class:`~specvlm_lit.drafter.eagle.EagleVLMDrafter`
    does.
    """

    def __init__(self, adapter, drafter, tree: TreeConfig | None = None, warp: WarpConfig | None = None, **kwargs):
        super().__init__(adapter, drafter, tree, warp, **kwargs)
        if not self.warp.greedy:
            raise BatchSamplingError(
                "batched speculative decoding is greedy only (temperature 0), got temperature "
                f"{self.warp.temperature}: decode sampled requests one at a time with SpeculativeDecoder "
                "(the bench's batch rows run at T = 0)"
            )
        if self.tree.adaptive:
            raise BatchSamplingError(
                "batched speculative decoding uses a static tree: set tree.adaptive=false (adaptive trees decide per "
                "request; decode those one at a time)"
            )

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Sequence[Tensor],
        image_features: Sequence[Sequence[Tensor] | None] | None = None,
        pixel_values: Sequence[Tensor | None] | None = None,
        *,
        max_new_tokens: int,
        eos_token_id=None,
        image_layouts: Sequence[Sequence[VisualLayout] | None] | None = None,
    ) -> BatchedResult:
        """Decode every request: ``input_ids[b]`` ``[1, T_b]`` with its images (``image_features[b]`` or
        ``pixel_values[b]``, or neither), up to ``max_new_tokens`` each, stopping a row right after its first EOS
        (kept), like HF ``generate()``. ``image_layouts[b]``: request b's visual layouts for the drafter's compressor
        (``None``: the adapter's layouts of ``pixel_values[b]``, see :func:`~.speculative.prompt_layouts`)."""
        t_start = time.perf_counter()
        if isinstance(input_ids, Tensor) or len(input_ids) == 0:
            raise ValueError("input_ids must be a non-empty list of [1, T] LongTensors, one per request")
        n = len(input_ids)
        feats_in = list(image_features) if image_features is not None else [None] * n
        px_in = list(pixel_values) if pixel_values is not None else [None] * n
        layouts = list(image_layouts) if image_layouts is not None else [None] * n
        if not len(feats_in) == len(px_in) == len(layouts) == n:
            raise ValueError(f"{n} requests but image_features / pixel_values / image_layouts of other lengths")
        eos: list[int] = []
        checked = []
        for b in range(n):
            eos, f = check_generate_inputs(
                self.adapter, input_ids[b], feats_in[b], px_in[b], max_new_tokens, eos_token_id, None
            )
            checked.append(f)
        training = [m for m in self._modules_in_eval() if getattr(m, "training", False)]
        for m in training:
            m.eval()
        try:
            return self._generate_batch(list(input_ids), checked, px_in, layouts, max_new_tokens, eos, t_start)
        finally:
            for m in training:
                m.train()

    def _target_forward(self, input_ids: Tensor, **kwargs):
        """Every target forward of a batch (prefill and verification): ``TargetAdapter.forward`` with a 4D mask and
        per-row positions. One place, so a drafter that reads more target layers asks for them here; its features
        are then read with :meth:`_target_features`."""
        return self.adapter.forward(input_ids, **kwargs)

    # ------------------------------------------------------------------------------------------------ prefill
    def _prefill(self, ids_list, feats_list, px_list, layouts):
        """Target prefill of the left-padded prompts -> (first tokens, target cache + rows, prompt features, the
        requests' visual layouts for the drafter's compressor)."""
        ad = self.adapter
        dev = ad.device
        if getattr(self.drafter, "compressor", None) is not None:
            layouts = [prompt_layouts(ad, f, px, given) for f, px, given in zip(feats_list, px_list, layouts)]
        feats = []
        for f, px in zip(feats_list, px_list):
            if px is not None:
                f = ad.encode_images(px)
            feats.append([] if f is None else f if isinstance(f, list) else list(f))  # EncodedImages kept as is
        lens = [int(x.shape[1]) for x in ids_list]
        width = max(lens)
        pad_id = 1 if ad.image_token_id == 0 else 0  # any id but the image placeholder: pads are never attended to
        ids = torch.full((len(ids_list), width), pad_id, dtype=torch.long, device=dev)
        pad = torch.zeros(len(ids_list), width, dtype=torch.bool, device=dev)
        pos = torch.zeros(len(ids_list), width, dtype=torch.long, device=dev)
        for b, x in enumerate(ids_list):
            ids[b, width - lens[b] :] = x[0].to(dev)
            pad[b, width - lens[b] :] = True
            pos[b, width - lens[b] :] = torch.arange(lens[b], device=dev)
        flat = EncodedImages.join(feats)  # the family's per-image facts (Qwen grids) survive the flattening
        tcache = kv_cache.growing(ad.new_cache())  # appends in place instead of concatenating per forward
        tout = self._target_forward(
            ids,
            attention_mask=_prefill_mask(pad, ad.dtype),
            image_features=flat or None,
            position_ids=pos,
            past_key_values=tcache,
            use_cache=True,
            logits_to_keep=1,
            **self._layer_kwargs,
        )
        first = tout.logits[:, -1].argmax(-1).tolist()
        return first, tcache, _Rows(pad), ids, feats, tout, lens, layouts

    def _draft_prefill(self, ids, feats, tout, lens, layouts, roots):
        """Draft rows of every prompt (visual rows possibly compressed) + its root row, left-padded -> h_root."""
        ad = self.adapter
        dev = ad.device
        compressor = getattr(self.drafter, "compressor", None)
        width = ids.shape[1]
        hidden = self._target_features(tout)
        rows_e, rows_f = [], []
        for b, n in enumerate(lens):
            real = slice(width - n, width)
            embeds = self._token_rows(ids[b : b + 1, real], ad.embed(ids[b : b + 1, real], feats[b] or None))[0]
            seq = build_draft_sequence(
                embeds, hidden[b, real], ids[b, real], ad.visual_token_ids, compressor=compressor, layouts=layouts[b]
            )
            root_e = ad.embed_tokens(torch.tensor([roots[b]], device=dev))
            rows_e.append(torch.cat([seq.embeds.to(root_e.dtype), root_e]))
            rows_f.append(torch.cat([seq.features, hidden[b, -1:]]))
        d_lens = [int(e.shape[0]) for e in rows_e]
        d_width = max(d_lens)
        h = rows_e[0].shape[-1]
        emb = torch.zeros(len(lens), d_width, h, dtype=rows_e[0].dtype, device=dev)
        fea = torch.zeros(len(lens), d_width, h, dtype=rows_f[0].dtype, device=dev)
        pad = torch.zeros(len(lens), d_width, dtype=torch.bool, device=dev)
        pos = torch.zeros(len(lens), d_width, dtype=torch.long, device=dev)
        for b, n in enumerate(d_lens):
            emb[b, d_width - n :] = rows_e[b]
            fea[b, d_width - n :] = rows_f[b]
            pad[b, d_width - n :] = True
            pos[b, d_width - n :] = torch.arange(n, device=dev)
        dcache = kv_cache.growing(self.drafter.new_cache())
        dh = self._draft(emb, fea, pos, _prefill_mask(pad.to(self._draft_device), self._draft_dtype), dcache)
        return dcache, _Rows(pad), d_lens, dh[:, -1]

    # ------------------------------------------------------------------------------------------------- round
    def _draft_trees(self, roots: Tensor, h_root: Tensor, dcache, drows: _Rows, d_real: Tensor, depth: int, total):
        """One tree per row (:class:`~.tree.BatchedTreeBuilder`), one batched drafter forward per level; the draft
        cache is cut back afterwards. Returns the batched :class:`~.tree.DraftTree`."""
        builder = BatchedTreeBuilder(self.tree.top_k, depth, total)
        frontier = builder.start(roots, self._logprobs(h_root))
        if frontier is not None:
            b, width = frontier.tokens.shape
            start = drows.width
            neg = torch.finfo(self._draft_dtype).min
            # Built once per round: the cached-rows part of every level's mask, and the rows' base positions.
            mask_buf = torch.empty(
                b, width, start + width * (depth - 1), dtype=self._draft_dtype, device=self._draft_device
            )
            mask_buf[:, :, :start] = _additive(drows.valid().to(self._draft_device), self._draft_dtype)[:, None]
            base = (d_real - 1).to(self._draft_device)[:, None]
            embed = self.adapter.embed_tokens
            prev = None
        while frontier is not None:
            m, level, dm = frontier.size, frontier.level, frontier.draft_mask
            if level == 1:
                feats = h_root[:, None].expand(-1, m, -1)
            else:
                feats = prev.gather(1, frontier.parent_rows[..., None].expand(-1, -1, prev.shape[-1]))
            block = mask_buf[:, :m, : start + dm.shape[2]]
            tree_cols = block[..., start:]
            tree_cols.fill_(neg)
            tree_cols.masked_fill_(dm.to(self._draft_device), 0.0)
            prev = self._draft(embed(frontier.tokens), feats, (base + level).expand(-1, m), block[:, None], dcache)
            frontier = builder.expand(self._logprobs(prev))
        if dcache.get_seq_length() > drows.width:  # tree rows were appended: only accepted rows stay
            kv_cache.crop(dcache, drows.width)
        return builder.build()

    def _generate_batch(self, ids_list, feats_list, px_list, layouts, max_new_tokens, eos, t_start) -> BatchedResult:
        ad = self.adapter
        dev = ad.device
        n_req = len(ids_list)
        stats = BatchedStats(batch_size=n_req, verify_rounds=[0] * n_req, finished_by_eos=[False] * n_req)
        out: list[list[int]] = [[] for _ in range(n_req)]
        sync(dev)
        t0 = time.perf_counter()
        first, tcache, trows, ids, feats, tout, lens, layouts = self._prefill(ids_list, feats_list, px_list, layouts)
        total = self._total_tokens(max(lens))
        stats.total_tokens = total
        active = []  # request index of every batch row
        for r in range(n_req):
            kept, finished = truncate_at_eos([first[r]], eos, max_new_tokens)
            out[r] += kept.tolist()
            if finished:
                stats.finished_by_eos[r] = bool(eos and out[r][-1] in eos)
            else:
                active.append(r)
        sync(dev)
        stats.time_prefill = time.perf_counter() - t0
        if not active:
            return self._finish(out, stats, t_start)
        t0 = time.perf_counter()
        dcache, drows, d_real, h_root = self._draft_prefill(ids, feats, tout, lens, layouts, first)
        d_real = torch.tensor(d_real, dtype=torch.long)
        t_real = torch.tensor(lens, dtype=torch.long)  # real target entries per row (the root's position)
        if len(active) < n_req:
            self._select(active, tcache, trows, dcache, drows)
            d_real, t_real, h_root = d_real[active], t_real[active], h_root[active]
        sync(dev)
        stats.time_draft += time.perf_counter() - t0
        neg = torch.finfo(ad.dtype).min

        while active:
            remaining = [max_new_tokens - len(out[r]) for r in active]
            depth = min(self.tree.depth, max(remaining) - 1) if self.tree.clip_to_budget else self.tree.depth
            roots = torch.tensor([out[r][-1] for r in active], dtype=torch.long, device=dev)

            # 1. Draft one tree per row (just the roots when no row has room for more than one token).
            t0 = time.perf_counter()
            if depth >= 1:
                trees = self._draft_trees(roots, h_root, dcache, drows, d_real, depth, total)
                tokens, parents, depths, tmask = trees.tokens, trees.parents, trees.depths, trees.mask
            else:
                b = len(active)
                tokens = roots[:, None]
                parents = torch.full((b, 1), -1, dtype=torch.long, device=dev)
                depths = torch.zeros((b, 1), dtype=torch.long, device=dev)
                tmask = torch.ones((b, 1, 1), dtype=torch.bool, device=dev)
            sync(dev)
            stats.time_draft += time.perf_counter() - t0
            if self.debug_hook is not None:
                self.debug_hook("tree", {"requests": list(active), "tokens": tokens, "parents": parents})

            # 2. Verify every tree in one target forward; accept per row (the round's one host synchronisation).
            t0 = time.perf_counter()
            b, n = tokens.shape
            start = trows.width
            mask = torch.cat([trows.valid()[:, None, :].expand(b, n, start), tmask], 2)
            vout = self._target_forward(
                tokens,
                attention_mask=_additive(mask, ad.dtype)[:, None],
                position_ids=t_real.to(dev)[:, None] + depths,
                past_key_values=tcache,
                use_cache=True,
                **self._layer_kwargs,
            )
            path, bonus = greedy_paths(tokens, parents, depths, tmask, vout.logits)
            host = torch.cat([path.long().flatten(), tokens.flatten(), bonus]).tolist()
            accepted = [[i for i in range(n) if host[r * n + i]] for r in range(b)]
            emitted = [
                [host[b * n + r * n + i] for i in acc[1:]] + [host[2 * b * n + r]] for r, acc in enumerate(accepted)
            ]
            trows.append(tcache, start, accepted)
            t_real = t_real + torch.tensor([len(a) for a in accepted])
            sync(dev)
            stats.time_verify += time.perf_counter() - t0

            stats.rounds += 1
            stats.active_per_round.append(b)
            stats.tree_sizes.append(n)
            still = []
            for row, r in enumerate(active):
                stats.verify_rounds[r] += 1
                kept, finished = truncate_at_eos(emitted[row], eos, remaining[row])
                out[r] += kept.tolist()
                if finished:
                    stats.finished_by_eos[r] = bool(eos and out[r] and out[r][-1] in eos)
                else:
                    still.append(row)
            if not still:
                break

            # 3. Finished rows leave the batch; the others extend their draft cache with their accepted rows.
            t0 = time.perf_counter()
            if len(still) < b:
                self._select(still, tcache, trows, dcache, drows)
                accepted = [accepted[i] for i in still]
                emitted = [emitted[i] for i in still]
                d_real, t_real = d_real[still], t_real[still]
                hidden = self._target_features(vout)[still]
                active = [active[i] for i in still]
            else:
                hidden = self._target_features(vout)
            h_root = self._extend(dcache, drows, d_real, hidden, accepted, emitted, neg)
            d_real = d_real + torch.tensor([len(a) for a in accepted])
            sync(dev)
            stats.time_draft += time.perf_counter() - t0
            if self.debug_hook is not None:
                info = {"requests": list(active), "sequences": [out[r] for r in active], "target_cache": tcache}
                info.update(
                    target_rows=trows, target_real=t_real, draft_cache=dcache, draft_rows=drows, draft_real=d_real
                )
                self.debug_hook("round", info)

        return self._finish(out, stats, t_start)

    def _finish(self, out: list[list[int]], stats: BatchedStats, t_start: float) -> BatchedResult:
        sync(self.adapter.device)
        stats.new_tokens = [len(o) for o in out]
        stats.time_total = time.perf_counter() - t_start
        stats.time_other = max(0.0, stats.time_total - stats.time_prefill - stats.time_draft - stats.time_verify)
        return BatchedResult([torch.tensor(o, dtype=torch.long) for o in out], stats)

    def _extend(self, dcache, drows: _Rows, d_real: Tensor, hidden: Tensor, accepted, emitted, neg) -> Tensor:
        """Rows ``(e_{y_{j+1}}, F(n_j))`` of every row's accepted nodes (ragged, padded to the longest), appended
        and compacted to each row's write pointer; returns the next ``h_root [B, H]``."""
        ad = self.adapter
        dev = ad.device
        b = len(accepted)
        k = max(len(a) for a in accepted)
        toks = torch.zeros(b, k, dtype=torch.long)
        nodes = torch.zeros(b, k, dtype=torch.long)
        real = torch.zeros(b, k, dtype=torch.bool)
        for r, (acc, em) in enumerate(zip(accepted, emitted)):
            toks[r, : len(em)] = torch.tensor(em)
            nodes[r, : len(acc)] = torch.tensor(acc)
            real[r, : len(acc)] = True
        real_d = real.to(dev)
        rows_e = ad.embed_tokens(toks.to(dev)) * real_d[..., None]
        rows_f = hidden.gather(1, nodes.to(dev)[..., None].expand(-1, -1, hidden.shape[-1])) * real_d[..., None]
        start = drows.width
        causal = torch.ones(k, k, dtype=torch.bool, device=dev).tril()
        new = (causal[None] & real_d[:, None, :]) | torch.eye(k, dtype=torch.bool, device=dev)[None]
        allowed = torch.cat([drows.valid()[:, None, :].expand(b, k, start), new], 2)
        positions = d_real.to(dev)[:, None] + torch.arange(k, device=dev)[None]
        mask = _additive(allowed.to(self._draft_device), self._draft_dtype)[:, None]
        dh = self._draft(rows_e, rows_f, positions, mask, dcache)
        last = torch.tensor([len(a) - 1 for a in accepted], device=dh.device)
        drows.append(dcache, start, [list(range(len(a))) for a in accepted])
        return dh[torch.arange(b, device=dh.device), last]

    @staticmethod
    def _select(keep: list[int], tcache, trows: _Rows, dcache, drows: _Rows) -> None:
        """Keep only the batch rows ``keep`` (finished requests leave) and cut both caches to their new width."""
        for cache, rows in ((tcache, trows), (dcache, drows)):
            cache.batch_select_indices(torch.tensor(keep, dtype=torch.long, device=rows.pad.device))
            rows.select(keep)
            if cache.get_seq_length() > rows.width:
                kv_cache.crop(cache, rows.width)
