"""Lossless speculative decoding with EAGLE-2 dynamic draft trees (batch size 1).

The loop (SPECVLM.md section 5) ties together the frozen target (:class:`~specvlm_lit.target.TargetAdapter`), an
EAGLE-style drafter, the tree bookkeeping of :mod:`.tree` and the acceptance rules of :mod:`.acceptance`::

    target prefill over the prompt            -> first new token x_T (root of round 1)
    draft prefill (rows of the prompt + root)  -> draft hidden predicting f_T
    repeat:
        draft a tree below the root            (1 batched drafter forward per depth >= 2)
        verify it with ONE target forward      (tree mask, positions = prefix + depth)
        accept (greedy / speculative sampling), compact the target KV to the accepted path
        extend the draft KV with the accepted tokens paired with the TARGET's true features;
        the same forward yields the next root's draft hidden

Output equals Hugging Face ``generate()`` token for token at temperature 0 and is distributed exactly like
``generate(do_sample=True)`` otherwise, whatever the drafter predicts (the drafter only affects speed).

Draft-row bookkeeping (the invariant that holds at the start of every round)
---------------------------------------------------------------------------
Let the accepted sequence be ``x_0 .. x_{S-1}`` followed by the root ``r = x_S`` (the last token the target emitted,
not yet fed to the target). Then

* the **target** KV cache holds exactly ``x_0 .. x_{S-1}`` (length ``S``); the root is node 0 of the next tree, at
  target position ``S`` (tree nodes at ``S + depth``);
* the **draft** KV cache holds exactly one row per pair ``(e_{t+1}, f_t)`` for ``t = 0 .. S-1`` (embedding of the
  next token, target final feature), i.e. the prompt rows of :func:`~specvlm_lit.drafter.sequence.build_draft_sequence`
  (visual rows possibly compressed: ``N`` visual pairs replaced by ``M``) followed by one row per later token. Its
  length is ``L = S + position_offset`` (``position_offset = M - N``, 0 without compressor), and the drafter position
  of every row is its row index, so the last row ``(e_r, f_{S-1})`` sits at position ``L - 1``;
* ``h_root`` = the drafter's output at that last row: its prediction of ``f_S``; ``lm_head(h_root)`` is the draft
  distribution of the first token after the root (tree depth 1).

Tree drafting: a depth-``d`` node ``y`` with parent ``p`` is fed as the row ``(e_y, h_p)`` (``h_p`` = the drafter's
output for ``p``; ``h_root`` for depth 1) at drafter position ``L - 1 + d``, with a 4D mask "all ``L`` cached rows +
own ancestors among the tree rows" (:attr:`~.tree.Frontier.draft_mask`). Tree rows are appended to the draft cache
while the tree grows and cropped back to ``L`` afterwards, so the draft cache only ever keeps accepted tokens.

After verification accepts the nodes ``root = n_0, n_1, .., n_a`` and emits ``y_1 .. y_a, y_{a+1}`` (``y_j`` = token
of ``n_j``; ``y_{a+1}`` the bonus token, the next root), the rows ``(e_{y_{j+1}}, F(n_j))`` for ``j = 0..a`` are
appended, where ``F(n_j)`` is the target's final feature of node ``n_j`` from the verification forward (its true
feature: the target saw the exact accepted path). That is ``a + 1`` rows at positions ``L .. L + a``; the output of
the last one is the next round's ``h_root``. The prefill works the same way: the prompt gives the rows
``t = 0 .. T-2`` and the root ``x_T`` adds ``(e_{x_T}, f_{T-1})``.

Sigma convention
----------------
``SpecStats.sigma = new_tokens / rounds`` where ``rounds`` counts every target forward that emitted tokens: the
prefill (which emits the first token; think of it as verifying an empty draft) plus every tree verification
(``verify_rounds``). It is therefore ``>= 1`` (exactly 1 for plain autoregressive decoding), ``<= depth + 1``, and
equals "autoregressive target forwards / speculative target forwards" for the same output, the ideal speedup.
``SpecStats.accept_length`` is the EAGLE-style average over verification rounds only
(``(new_tokens - 1) / verify_rounds``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import kv_cache
from ..attention_masks import causal_mask
from ..drafter.sequence import build_draft_sequence
from ..targets.inputs import VisualLayout
from .acceptance import WarpConfig, accept_greedy, accept_sampling, truncate_at_eos
from .configs import TreeConfig
from .cost_model import RoundCostModel
from .decoder import TargetDecoder, pick_token, sync
from .tree import DraftTree, TreeBuilder

__all__ = [
    "DEFAULT_TOTAL_TOKENS_CANDIDATES",
    "SpecResult",
    "SpecStats",
    "SpeculativeDecoder",
    "TreeConfig",
    "choose_total_tokens",
    "default_expected_tokens",
]

DEFAULT_TOTAL_TOKENS_CANDIDATES = (8, 16, 24, 32, 48, 60, 80, 100)

DebugHook = Callable[[str, dict], None]


# ----------------------------------------------------------------------------------------------------- stats
@dataclass(kw_only=True)
class PhaseTimes:
    """Wall-clock seconds of a decoding call by phase, shared by :class:`SpecStats` and ``BatchedStats``.

    Keyword-only, so that the subclasses' own fields keep their positions in ``__init__``; :meth:`_fields_dict`
    lists these last, where they were before they moved to this base.
    """

    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_other: float = 0.0
    time_total: float = 0.0

    def _fields_dict(self) -> dict[str, Any]:
        """The dataclass fields by name: the subclass's own first, then the phase times."""
        phases = PhaseTimes.__dataclass_fields__
        own = [k for k in self.__dataclass_fields__ if k not in phases]
        return {k: getattr(self, k) for k in [*own, *phases]}


@dataclass
class SpecStats(PhaseTimes):
    """Counters and timings of one :meth:`SpeculativeDecoder.generate` call (see the module doc for sigma).

    Times are wall-clock seconds (CUDA is synchronised at phase boundaries): ``time_prefill`` = image encoding (when
    ``pixel_values`` were given) + target prefill + first token; ``time_draft`` = draft prefill, tree drafting and the
    draft-cache extension; ``time_verify`` = target tree forward + acceptance + KV compaction; ``time_other`` = the
    rest (validation, bookkeeping).
    """

    new_tokens: int = 0
    verify_rounds: int = 0
    accepted_drafts: list[int] = field(default_factory=list)  # per verification round, before EOS/budget cut
    emitted_per_round: list[int] = field(default_factory=list)  # per verification round, after the cut
    tree_sizes: list[int] = field(default_factory=list)  # per verification round, nodes incl. the root
    tree_depths: list[int] = field(default_factory=list)  # per verification round, deepest node
    draft_kv_lens: list[int] = field(default_factory=list)  # draft cache length after each round's extension
    prompt_len: int = 0
    target_visual_tokens: int = 0
    draft_visual_tokens: int = 0
    draft_prompt_rows: int = 0
    draft_kv_len: int = 0  # final draft cache length (accepted rows)
    target_kv_len: int = 0  # final target cache length
    total_tokens: int = 0  # tree budget used (resolved when the config says "auto")
    finished_by_eos: bool = False

    @property
    def rounds(self) -> int:
        """Target forwards that emitted tokens: the prefill + every verification round."""
        return self.verify_rounds + (1 if self.new_tokens > 0 else 0)

    @property
    def sigma(self) -> float:
        """Generated tokens per target round (prefill counted as a round), ``>= 1``."""
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def accept_length(self) -> float:
        """EAGLE-style mean tokens emitted per verification round (prefill token excluded); nan without rounds."""
        return (self.new_tokens - 1) / self.verify_rounds if self.verify_rounds else float("nan")

    def as_dict(self) -> dict[str, Any]:
        d = self._fields_dict()
        d.update(rounds=self.rounds, sigma=self.sigma, accept_length=self.accept_length)
        return d


@dataclass
class SpecResult:
    tokens: Tensor  # LongTensor [n] new tokens (prompt excluded), on CPU
    stats: SpecStats


# ------------------------------------------------------------------------------------------------- helpers
def _module_dtype_device(module, fallback_dtype, fallback_device) -> tuple[torch.dtype, torch.device]:
    params = getattr(module, "parameters", None)
    if callable(params):
        for p in params():
            if p.is_floating_point():
                return p.dtype, p.device
            break
    return fallback_dtype, fallback_device


def square_layouts(image_features: Sequence[Tensor] | None) -> list[VisualLayout]:
    """One plain square-grid layout per pre-encoded visual: the guess left when a request brings only
    ``image_features`` (no pixels, no ``image_layouts``). Right for square images at a LLaVA-1.5 target's native size;
    anything else must say its layouts (``adapter.layouts_of(visual)``)."""
    layouts = []
    for feats in image_features or []:
        n = int(feats.shape[0])
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"a visual of {n} tokens given as image_features only is not a square grid, so its layout is "
                f"unknown: pass image_layouts=adapter.layouts_of(visual) (or pixel_values) with it"
            )
        layouts.append(VisualLayout([("grid", side, side)]))
    return layouts


def prompt_layouts(
    adapter, image_features, pixel_values, image_layouts: Sequence[VisualLayout] | None
) -> list[VisualLayout]:
    """The layouts of a request's visuals for the drafter's compressor: ``image_layouts`` when given, else the
    adapter's layouts of the pixel inputs (the family owns them: LLaVA grids, AnyRes tiles, Qwen merged patches,
    video frames), else :func:`square_layouts` of the pre-encoded features."""
    if image_layouts is not None:
        return list(image_layouts)
    if pixel_values is not None:
        return adapter.layouts_of(pixel_values)
    return square_layouts(image_features)


# ------------------------------------------------------------------------------------------ auto tree budget
def default_expected_tokens(depth: int) -> Callable[[int], float]:
    """Simple acceptance model: tokens per round grow ~logarithmically with the tree size, capped by depth + 1.

    ``E(n) = min(depth + 1, 1 + 0.6 * log2(n))`` (n = tree size incl. root): about 4.5 at n = 60, which is the
    regime EAGLE-2 reports for well-trained drafters. Pass your own model (e.g. fitted on measured acceptance) to
    :func:`choose_total_tokens` when you have one.
    """

    def expected(n: int) -> float:
        return min(depth + 1.0, 1.0 + 0.6 * math.log2(max(n, 1)))

    return expected


def _max_tree_nodes(top_k: int, depth: int) -> int:
    """Root + every pool node a ``top_k`` / ``depth`` tree can create."""
    return 1 + top_k + (depth - 1) * top_k * top_k


@torch.no_grad()
def time_verification(
    adapter, prefix_len: int, sizes: Sequence[int], *, top_k: int = 10, repeats: int = 3
) -> dict[int, float]:
    """Seconds of :meth:`TargetAdapter.tree_forward` over trees of each size (root included) after a dummy
    prefix of ``prefix_len`` text tokens, on the current device: the median of ``repeats`` runs after a warm-up."""
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 1:
        raise ValueError(f"prefix_len must be an int >= 1, got {prefix_len!r}")
    device = adapter.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, adapter.vocab_size, (1, prefix_len), generator=g)
    ids[adapter.visual_token_mask(ids)] = 0
    cache = adapter.new_cache()
    adapter.forward(ids.to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    out: dict[int, float] = {}
    for n in sizes:
        parents = [-1] + [(i - 1) // top_k for i in range(1, n)]  # a valid topologically ordered tree of n nodes
        tree = DraftTree.from_parents(torch.randint(0, adapter.vocab_size, (n,), generator=g), parents)
        times = []
        for rep in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            adapter.tree_forward(
                tree.tokens[None].to(device), tree.position_ids(prefix_len).to(device), tree.mask, cache
            )
            sync(device)
            if rep > 0:
                times.append(time.perf_counter() - t0)
            kv_cache.crop(cache, prefix_len)
        out[int(n)] = statistics.median(times)
    return out


def choose_total_tokens(
    adapter,
    prefix_len: int,
    candidates: Sequence[int] = DEFAULT_TOTAL_TOKENS_CANDIDATES,
    *,
    depth: int = 7,
    top_k: int = 10,
    expected_tokens: Callable[[int], float] | None = None,
    draft_time: float = 0.0,
    repeats: int = 3,
) -> int:
    """Pick the tree size that maximises expected tokens per second on the current device.

    Times :meth:`TargetAdapter.tree_forward` for every candidate size (:func:`time_verification`), then returns
    ``argmax_n expected_tokens(n) / (t_verify(n) + draft_time)``. ``draft_time`` is the (size-independent) drafting
    cost per round in seconds, if known. Sizes are clipped to what a ``top_k``/``depth`` tree can hold.
    """
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 1:
        raise ValueError(f"prefix_len must be an int >= 1, got {prefix_len!r}")
    max_nodes = _max_tree_nodes(top_k, depth)
    sizes = sorted({min(int(c), max_nodes) for c in candidates if not isinstance(c, bool) and int(c) >= 2})
    if not sizes:
        raise ValueError(f"candidates must contain sizes >= 2, got {list(candidates)!r}")
    if len(sizes) == 1:
        return sizes[0]
    expected = expected_tokens or default_expected_tokens(depth)
    times = time_verification(adapter, prefix_len, sizes, top_k=top_k, repeats=repeats)
    best, best_score = sizes[0], -1.0
    for n in sizes:
        score = expected(n) / (times[n] + max(float(draft_time), 0.0))
        if score > best_score:
            best, best_score = n, score
    return best


# ------------------------------------------------------------------------------------------------ decoder
class SpeculativeDecoder(TargetDecoder):
    """EAGLE-2 dynamic-tree speculative decoding of a :class:`~specvlm_lit.target.TargetAdapter` (batch size 1).

    Args:
        adapter: the frozen target.
        drafter: an EAGLE-style drafter: ``drafter(token_embeds [1,T,H], features [1,T,H], position_ids [1,T],
            attention_mask=None | 4D additive [1,1,T,past+T], past_key_values=cache, use_cache=True)`` returning an
            object with ``.hidden`` ``[1,T,H]`` (predicted next features) and ``.past_key_values``; plus
            ``drafter.new_cache()``, ``drafter.compressor`` (``None`` or a visual compressor) and optionally
            ``drafter.check_target(adapter)`` (called once here). Token embedding and LM head are the target's.
        tree: draft-tree shape.
        warp: sampling configuration (``temperature == 0``: greedy).
        cost_model: for ``tree.adaptive``: a ready :class:`~.cost_model.RoundCostModel` (e.g. shared between
            decoders or with fixed timings in tests); ``None`` = time the target's verification on the first request.
        debug_hook: optional ``hook(event, info)`` for tests / debugging, called with ``"prefill"`` (after the
            draft prefill), ``"tree"`` (after a tree is built, before verification) and ``"round"`` (after a
            round's draft-cache extension). ``info`` holds live objects (caches, tree, ...): read, don't modify.
    """

    def __init__(
        self,
        adapter,
        drafter,
        tree: TreeConfig | None = None,
        warp: WarpConfig | None = None,
        *,
        debug_hook: DebugHook | None = None,
        cost_model: RoundCostModel | None = None,
    ):
        tree = TreeConfig() if tree is None else tree
        warp = WarpConfig() if warp is None else warp
        if not isinstance(tree, TreeConfig):
            raise ValueError(f"tree must be a TreeConfig, got {type(tree).__name__}")
        if not isinstance(warp, WarpConfig):
            raise ValueError(f"warp must be a WarpConfig, got {type(warp).__name__}")
        for attr in ("new_cache",):
            if not callable(getattr(drafter, attr, None)):
                raise ValueError(f"drafter {type(drafter).__name__} has no {attr}() method")
        check = getattr(drafter, "check_target", None)
        if callable(check):
            try:
                check(adapter)
            except ValueError:
                raise
            except Exception as e:  # noqa: BLE001 - normalise to the documented error type
                raise ValueError(f"drafter does not match this target: {e}") from e
        self.adapter = adapter
        self.drafter = drafter
        # Target layers the drafter reads (EAGLE-3); every target forward returns them with the logits.
        self._hidden_layers = tuple(getattr(drafter, "hidden_layers", ()) or ())
        # Passed only when layers are wanted, so targets without the keyword (test stand-ins) keep working.
        self._layer_kwargs = {"hidden_layers": self._hidden_layers} if self._hidden_layers else {}
        self.tree = tree
        self.warp = warp
        self.debug_hook = debug_hook
        self._auto_total: int | None = None
        if cost_model is not None and not isinstance(cost_model, RoundCostModel):
            raise ValueError(f"cost_model must be a RoundCostModel or None, got {type(cost_model).__name__}")
        # tree.adaptive: timings of this device (measured on the first request unless given).
        self._cost: RoundCostModel | None = cost_model
        self._draft_dtype, self._draft_device = _module_dtype_device(drafter, adapter.dtype, adapter.device)

    # --------------------------------------------------------------------------------------------- drafter
    # Every interaction with the drafter goes through these three methods (batch-1 and batched decoding alike), so
    # a drafter with its own head or its own target features changes them and nothing else.
    def _draft(self, embeds: Tensor, features: Tensor, positions: Tensor, mask: Tensor | None, cache) -> Tensor:
        """One drafter forward over ``T`` new rows of ``B`` sequences: ``embeds`` / ``features`` ``[B, T, H]``,
        ``positions`` ``[B or 1, T]``, ``mask`` ``None`` (causal) or additive 4D ``[B or 1, 1, T, past + T]``;
        the rows are appended to ``cache``. Returns ``hidden [B, T, H]`` in the drafter dtype."""
        out = self.drafter(
            embeds.to(self._draft_device, self._draft_dtype),
            features.to(self._draft_device, self._draft_dtype),
            positions.to(self._draft_device),
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
        )
        return out.hidden

    def _logprobs(self, hidden: Tensor) -> Tensor:
        """Draft log-probs ``[..., V]`` (float32, over the target vocabulary) from the drafter's outputs ``hidden
        [..., H]``, via the target's LM head."""
        ad = self.adapter
        draft_logprobs = getattr(self.drafter, "draft_logprobs", None)
        if callable(draft_logprobs):  # the drafter protocol (specvlm_lit.drafter.base): own head / pruned vocab
            return draft_logprobs(hidden, ad)
        logits = ad.lm_head(hidden.to(ad.device, ad.dtype))
        return torch.log_softmax(logits.float(), dim=-1)

    def _target_features(self, target_output) -> Tensor:
        """The target features the drafter reads, ``[B, T, H]``, from a target forward's output (prefill or
        verification): the final-norm hidden states, i.e. the LM head's input."""
        project = getattr(self.drafter, "project_features", None)
        if callable(project):  # the drafter protocol: EAGLE-3 fuses the layers requested by _hidden_layers
            return project(target_output)
        return target_output.hidden

    def _token_rows(self, ids: Tensor, inputs_embeds: Tensor) -> Tensor:
        """The drafter's token-side rows of a prompt ``[B, T, H]``: the target's inputs (visual embeddings at image
        rows) unless the drafter was trained on the image placeholder's embedding there (``image_rows``)."""
        token_embeds = getattr(self.drafter, "token_embeds", None)
        return token_embeds(self.adapter, ids, inputs_embeds) if callable(token_embeds) else inputs_embeds

    def _draft_tree(self, root: int, h_root: Tensor, cache, draft_len: int, depth: int, total: int) -> DraftTree:
        """Grow the dynamic tree below ``root``; the draft cache is restored to ``draft_len`` rows afterwards.

        Built once per round: one additive mask buffer ``[top_k, draft_len + tree slots]`` whose cached-rows part
        stays zero (every tree row sees every accepted row; a level only rewrites its tree columns) and the
        positions of every level (``draft_len - 1 + level``); each level's mask and positions are views of them.
        """
        cost = self._cost if self.tree.adaptive else None
        levels = 0  # draft forwards so far; their cost is taken from the model (deterministic given its timings)
        builder = TreeBuilder(self.tree.top_k, depth, total)
        logprobs = self._logprobs(h_root)
        frontier = builder.start(root, logprobs)
        embed = self.adapter.embed_tokens
        probs = None
        if frontier is not None:
            width = frontier.size
            mask_buf = torch.zeros(
                width, draft_len + width * (depth - 1), dtype=self._draft_dtype, device=self._draft_device
            )
            positions = torch.arange(draft_len, draft_len + depth - 1, device=self._draft_device)
            neg = torch.finfo(self._draft_dtype).min
        prev_hidden = h_root[None]  # outputs of the previous batched forward; the root's "row" is h_root
        while frontier is not None:
            if cost is not None:
                probs, child_prob = self._acceptance_estimates(cost, builder, logprobs, probs)
                frontier_probs = probs[frontier.pool_indices.cpu()]
                if not cost.worth_another_level(
                    builder.pool_scores,
                    frontier_probs,
                    child_prob,
                    levels * (cost.step.value or 0.0),
                    total,
                    node_probs=probs,
                ):
                    break
                t_step = time.perf_counter()
            m, level, dm = frontier.size, frontier.level, frontier.draft_mask
            # Level 1 hangs under the root (parent feature h_root); deeper levels under the previous frontier.
            if level == 1:
                feats = h_root.expand(m, -1)
            else:
                feats = prev_hidden.index_select(0, frontier.parent_rows.to(prev_hidden.device))
            past, expected = cache.get_seq_length(), draft_len + dm.shape[1] - m
            if past != expected:  # pragma: no cover - internal invariant
                raise RuntimeError(f"internal error: draft cache has {past} rows, mask expects {expected}")
            # Tree rows see every accepted row and their own ancestors among the tree rows.
            block = mask_buf[:m, : draft_len + dm.shape[1]]
            tree_cols = block[:, draft_len:]
            tree_cols.fill_(neg)
            tree_cols.masked_fill_(dm.to(self._draft_device), 0.0)
            hidden = self._draft(
                embed(frontier.tokens.to(self.adapter.device))[None],
                feats[None],
                positions[level - 1 : level].expand(1, m),
                block[None, None],
                cache,
            )[0]
            prev_hidden = hidden
            logprobs = self._logprobs(hidden)
            frontier = builder.expand(logprobs)
            if cost is not None:
                sync(self._draft_device)
                cost.step.update(time.perf_counter() - t_step)
                levels += 1
        kv_cache.crop(cache, draft_len)
        if cost is not None:
            probs, _ = self._acceptance_estimates(cost, builder, logprobs, probs)
            builder.total_tokens, _ = cost.best_size(
                builder.pool_scores, levels * (cost.step.value or 0.0), total, node_probs=probs
            )
        return builder.build()

    @staticmethod
    def _acceptance_estimates(
        cost: RoundCostModel, builder: TreeBuilder, logprobs: Tensor, known: Tensor | None
    ) -> tuple[Tensor, float]:
        """Acceptance probability of every pool node (extending ``known``, the values of the levels before) and
        the typical one of a best child at the last level."""
        best_child = logprobs.detach().float().max(-1).values.exp()
        cal = cost.calibration
        if cal is None:
            return builder.pool_scores.detach().float().exp().cpu(), float(best_child.mean())
        known = torch.zeros(0) if known is None else known
        probs = cal.extend(known, builder.pool_scores, builder.pool_parents)
        return probs, float(cal.rate(best_child, True).mean())

    def _observe_acceptance(self, tree: DraftTree, accepted: Tensor) -> None:
        """Feed the verified outcome of every node whose parent was accepted to the cost model's calibration."""
        cal = self._cost.calibration if (self.tree.adaptive and self._cost is not None) else None
        if cal is None or tree.size < 2:
            return
        parents, scores = tree.parents[1:].cpu(), tree.scores.detach().float().cpu()
        cond_q = (scores[1:] - scores[parents]).exp()
        on_path = torch.zeros(tree.size, dtype=torch.bool)
        on_path[accepted.cpu()] = True
        cal.observe(cond_q, cal.first_children(parents), on_path[parents], on_path[1:])

    # -------------------------------------------------------------------------------------------- generate
    def _hook(self, event: str, ids: Tensor, out_tokens: list[int], draft_cache, draft_len: int, **info) -> None:
        """Call ``debug_hook`` (if any) with the state every event shares plus the event's own ``info``."""
        if self.debug_hook is not None:
            sequence = self._sequence(ids, out_tokens)
            self.debug_hook(event, {"draft_cache": draft_cache, "draft_len": draft_len, "sequence": sequence, **info})

    @staticmethod
    def _sequence(ids: Tensor, out_tokens: list[int]) -> Tensor:
        """Prompt + emitted tokens (CPU); the last one is the current root, not yet in either KV cache."""
        return torch.cat([ids[0].cpu(), torch.tensor(out_tokens, dtype=torch.long)])

    def _total_tokens(self, prefix_len: int) -> int:
        if self.tree.adaptive:
            return self._adaptive_cap(prefix_len)
        if not self.tree.auto:
            return int(self.tree.total_tokens)
        if self._auto_total is None:
            self._auto_total = choose_total_tokens(
                self.adapter, prefix_len, depth=self.tree.depth, top_k=self.tree.top_k
            )
        return self._auto_total

    def _adaptive_cap(self, prefix_len: int) -> int:
        """Largest tree an adaptive round may verify; times the target's verification once per decoder."""
        top_k, depth = self.tree.top_k, self.tree.depth
        cap = max(DEFAULT_TOTAL_TOKENS_CANDIDATES) if self.tree.auto else int(self.tree.total_tokens)
        cap = max(2, min(cap, _max_tree_nodes(top_k, depth)))
        if self._cost is None:
            sizes = sorted({2, cap, *(c for c in DEFAULT_TOTAL_TOKENS_CANDIDATES if c < cap)})
            self._cost = RoundCostModel(time_verification(self.adapter, prefix_len, sizes, top_k=top_k))
        return cap

    def _modules_in_eval(self):
        return (self.drafter,)

    def _generate(
        self,
        input_ids,
        image_features,
        pixel_values,
        max_new_tokens,
        eos,
        generator,
        t_start,
        image_layouts: Sequence[VisualLayout] | None = None,
    ) -> SpecResult:
        """``image_layouts``: one :class:`~specvlm_lit.targets.VisualLayout` per visual of the prompt, in order, for
        the drafter's visual compressor (default: :func:`prompt_layouts`, the adapter's layouts of ``pixel_values``)."""
        ad = self.adapter
        dev = ad.device
        stats = SpecStats(prompt_len=int(input_ids.shape[1]))
        ids = input_ids.to(dev, torch.long)
        T = ids.shape[1]
        n_visual = int(ad.visual_token_mask(ids).sum())
        stats.target_visual_tokens = n_visual
        out_tokens: list[int] = []

        depths: list[Tensor] = []  # deepest node of every verified tree

        def finish() -> SpecResult:
            sync(dev)
            stats.tree_depths = torch.stack(depths).tolist() if depths else []
            stats.new_tokens = len(out_tokens)
            stats.time_total = time.perf_counter() - t_start
            stats.time_other = max(0.0, stats.time_total - stats.time_prefill - stats.time_draft - stats.time_verify)
            stats.target_kv_len = tcache.get_seq_length()
            return SpecResult(torch.tensor(out_tokens, dtype=torch.long), stats)

        # 1. Target prefill -> first token.
        sync(dev)
        t0 = time.perf_counter()
        compressor = getattr(self.drafter, "compressor", None)
        layouts = prompt_layouts(ad, image_features, pixel_values, image_layouts) if compressor is not None else None
        if pixel_values is not None:
            image_features = ad.encode_images(pixel_values)
        tcache = kv_cache.growing(ad.new_cache())  # appends in place instead of concatenating per forward
        tout = ad.forward(
            ids,
            image_features=image_features,
            past_key_values=tcache,
            use_cache=True,
            logits_to_keep=1,
            **self._layer_kwargs,
        )
        first = pick_token(tout.logits[0, -1], self.warp, generator)
        kept, finished = truncate_at_eos([first], eos, max_new_tokens)
        out_tokens += kept.tolist()
        stats.finished_by_eos = bool(finished and eos and out_tokens[-1] in eos)
        sync(dev)
        stats.time_prefill = time.perf_counter() - t0
        total = self._total_tokens(T)
        stats.total_tokens = total
        if finished:
            return finish()

        # 2. Draft prefill: prompt rows (t = 0..T-2, visual rows possibly compressed) + the root row.
        t0 = time.perf_counter()
        embeds = self._token_rows(ids, ad.embed(ids, image_features))[0]
        hidden = self._target_features(tout)[0]
        seq = build_draft_sequence(embeds, hidden, ids[0], ad.visual_token_ids, compressor=compressor, layouts=layouts)
        stats.draft_visual_tokens = n_visual + (seq.position_offset if compressor is not None else 0)
        stats.draft_prompt_rows = seq.length
        root = out_tokens[-1]
        root_embed = ad.embed_tokens(torch.tensor([root], device=dev))
        d_embeds = torch.cat([seq.embeds.to(root_embed.dtype), root_embed])
        d_feats = torch.cat([seq.features, hidden[-1:]])
        draft_len = d_embeds.shape[0]
        dcache = kv_cache.growing(self.drafter.new_cache())
        dh = self._draft(d_embeds[None], d_feats[None], torch.arange(draft_len, device=dev)[None], None, dcache)
        h_root = dh[0, -1]
        sync(dev)
        stats.time_draft += time.perf_counter() - t0
        self._hook("prefill", ids, out_tokens, dcache, draft_len, target_cache=tcache, draft_sequence=seq)

        while True:
            remaining = max_new_tokens - len(out_tokens)
            depth = min(self.tree.depth, remaining - 1) if self.tree.clip_to_budget else self.tree.depth
            prefix_len = tcache.get_seq_length()

            # 3. Draft a tree below the root (or just the root when the budget has room for one token only).
            t0 = t_round = time.perf_counter()
            if depth >= 1:
                tree = self._draft_tree(root, h_root, dcache, draft_len, depth, total)
            else:
                tree = DraftTree.from_parents(torch.tensor([root], device=dev), [-1])
            sync(dev)
            t_tree = time.perf_counter() - t0
            stats.time_draft += t_tree
            self._hook("tree", ids, out_tokens, dcache, draft_len, tree=tree, root=root, h_root=h_root)

            # 4. Verify with one target forward, accept, compact the target KV.
            t0 = time.perf_counter()
            vout = ad.tree_forward(
                tree.tokens[None].to(dev),
                tree.position_ids(prefix_len).to(dev),
                tree.mask,
                tcache,
                **self._layer_kwargs,
            )
            logits = vout.logits[0]
            # The accept decision is the round's one host synchronisation: acceptance returns its result on the host.
            if self.warp.greedy:
                acc = accept_greedy(tree, logits)
            else:
                acc = accept_sampling(tree, logits, self.warp, generator)
            kv_cache.compact(tcache, prefix_len, acc.accepted)
            self._observe_acceptance(tree, acc.accepted)
            sync(dev)
            stats.time_verify += time.perf_counter() - t0

            stats.verify_rounds += 1
            stats.accepted_drafts.append(acc.num_accepted_drafts)
            stats.tree_sizes.append(tree.size)
            depths.append(tree.depths.max())  # read at the end: no synchronisation inside the round
            kept, finished = truncate_at_eos(acc.tokens, eos, remaining)
            stats.emitted_per_round.append(int(kept.numel()))
            out_tokens += kept.tolist()
            if finished:
                stats.finished_by_eos = bool(eos and out_tokens and out_tokens[-1] in eos)
                stats.draft_kv_len = draft_len
                stats.draft_kv_lens.append(draft_len)
                return finish()

            # 5. Extend the draft cache: rows (e_{y_{j+1}}, F(n_j)) for the accepted nodes n_0 = root .. n_a.
            t0 = time.perf_counter()
            k = acc.tokens.numel()
            rows_e = ad.embed_tokens(acc.tokens.to(dev))
            rows_f = self._target_features(vout)[0].index_select(0, acc.accepted.to(dev))
            mask = causal_mask(k, draft_len, self._draft_dtype, self._draft_device)
            positions = torch.arange(draft_len, draft_len + k, device=dev)[None]
            dh = self._draft(rows_e[None], rows_f[None], positions, mask, dcache)
            draft_len += k
            h_root = dh[0, -1]
            root = int(acc.tokens[-1])  # host tensor: no synchronisation
            sync(dev)
            t_end = time.perf_counter()
            stats.time_draft += t_end - t0
            if self._cost is not None and self.tree.adaptive:
                self._cost.fixed.update(max(0.0, t_end - t_round - t_tree - self._cost.verify_time(tree.size)))
            stats.draft_kv_lens.append(draft_len)
            stats.draft_kv_len = draft_len
            self._hook("round", ids, out_tokens, dcache, draft_len, acceptance=acc, target_cache=tcache)
