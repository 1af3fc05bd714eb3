"""Decoding benchmark: AR vs HF prompt lookup vs HF assisted vs EagleVLM vs SpecVLM, side by side in one process.

``python decode.py mode=bench`` calls :func:`run_benchmark`. For every temperature, resolution and held-out test
sample, every method decodes the *same* prompt right after the others (so machine load drifts hit all methods
alike), after ``warmup`` untimed runs per method and temperature. Per run we record the wall time (image encoding
included for every method), new tokens, time to first token, target forwards, drafter visual tokens and draft KV
length, and whether the greedy output equals the AR output. Aggregates per method x temperature (and per task type
and resolution) go to ``bench.json``, ``bench.md`` and ``bench.png`` in the output directory.

Definitions (also in docs/decoding.md):

* ``tau`` = sum of AR wall times / sum of the method's wall times over the same samples (AR = 1).
* ``sigma`` = new tokens / target forwards that emitted them. Speculative: the prefill + every tree verification
  (``SpecStats.rounds``). HF methods: forwards of the target model counted with a forward hook (the assistant's own
  forwards are not counted). AR = 1.
* ``ttft_ms``: HF methods: wall time of a separate ``max_new_tokens=1`` call on the same input (image encoding +
  prefill); speculative: ``SpecStats.time_prefill`` (image encoding + target prefill + first token).
* ``identical``: fraction of greedy (T = 0) outputs token-identical to the AR output; ``null`` at T > 0 (samples
  differ by design; losslessness there is a statement about distributions, tested in tests/test_speculative.py).

How the two Hugging Face baselines are run (transformers 5.23, checked in its sources):

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

import glob
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .pipeline import (
    DTYPES,
    DecodeInputError,
    check_max_new_tokens,
    check_sampling,
    check_seed,
    check_tree,
    drafter_kind,
    find_exported_drafters,
    pick_drafter,
)

__all__ = ["METHODS", "BenchSettings", "collect_samples", "run_benchmark", "settings_from_config"]

EMBEDDED_ASSISTANT = "data/embedded_assistant"  # built by conf/assistant_recipe.yaml
METHODS = ("ar", "prompt_lookup", "assisted", "eaglevlm", "specvlm", "eaglevlm_adaptive", "specvlm_adaptive")
DRAFTER_KINDS = ("eaglevlm", "specvlm")
# *_adaptive: the same drafter with cost-aware trees (tree.adaptive=true, specvlm_lit/decoding/cost_model.py).
SPEC_METHODS = DRAFTER_KINDS + ("eaglevlm_adaptive", "specvlm_adaptive")
HF_METHODS = ("ar", "prompt_lookup", "assisted")
LABELS = {"ar": "AR (HF generate)", "prompt_lookup": "HF prompt lookup", "assisted": "HF assisted",
          "eaglevlm": "EagleVLM", "specvlm": "SpecVLM (select)", "eaglevlm_adaptive": "EagleVLM, adaptive tree",
          "specvlm_adaptive": "SpecVLM, adaptive tree"}


def drafter_of(method: str) -> str:
    """The drafter kind a speculative method runs (``specvlm_adaptive`` -> ``specvlm``)."""
    return method.removesuffix("_adaptive")


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class BenchSettings:
    target: str
    out_dir: str
    test_urls: list[str]
    corpus_dir: str | None = None
    outputs_root: str | None = None  # where train.py exports live (drafter discovery)
    resolutions: list[int] = field(default_factory=lambda: [64, 128])
    samples_per_resolution: int = 8
    temperatures: list[float] = field(default_factory=lambda: [0.0, 1.0])
    max_new_tokens: int = 64
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    drafters: dict = field(default_factory=lambda: {"eaglevlm": None, "specvlm": None})
    assistant: str | None = None
    assistant_auto: bool = False  # picked by bench.assistant=auto: a mismatch skips the row instead of failing
    prompt_lookup_num_tokens: int = 10
    prompt_lookup_suppress_image_token: bool = True
    warmup: int = 1
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = 0
    tree: dict = field(default_factory=lambda: {"top_k": 10, "depth": 7, "total_tokens": 60})
    dtype: str = "float32"
    device: str = "cpu"


def _int_list(v, name: str, minimum: int) -> list[int]:
    if isinstance(v, (int, str)) or v is None:
        v = [v]
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
            raise DecodeInputError(f"bench.{name} must be a list of integers >= {minimum}, got {list(v)!r}")
        out.append(int(x))
    if not out:
        raise DecodeInputError(f"bench.{name} must not be empty")
    return out


def settings_from_config(cfg: Mapping, out_dir: str, root: str | os.PathLike) -> BenchSettings:
    """Validate the ``bench`` block + top-level options of ``conf/decode.yaml`` (no model work, no torch)."""
    b = dict(cfg.get("bench") or {})
    unknown = (set(b) - {f for f in BenchSettings.__dataclass_fields__} - {"test_urls"}) | ({"assistant_auto"} & set(b))
    if unknown:
        raise DecodeInputError(f"unknown bench option(s) {sorted(unknown)}")
    methods = b.get("methods", list(METHODS))
    if isinstance(methods, str):
        methods = [methods]
    methods = list(methods or [])
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise DecodeInputError(f"bench.methods must be a non-empty subset of {list(METHODS)}, got {methods!r}")
    if "ar" not in methods:
        methods = ["ar"] + methods  # the baseline every ratio is computed against
    methods = [m for m in METHODS if m in methods]  # canonical order, AR first
    temps = b.get("temperatures", [0.0, 1.0])
    if isinstance(temps, (int, float)):
        temps = [temps]
    temps = [check_sampling(t, cfg.get("top_p", 1.0), cfg.get("top_k", 0))[0] for t in (temps or [])]
    if not temps:
        raise DecodeInputError("bench.temperatures must not be empty")
    temps = sorted(set(temps))
    urls = b.get("test_urls")
    if isinstance(urls, str):
        urls = [urls]
    if not urls:
        raise DecodeInputError("bench.test_urls is empty: point it at the held-out test shards (test-*.tar)")
    drafters = dict(b.get("drafters") or {})
    unknown = set(drafters) - set(DRAFTER_KINDS)
    if unknown:
        raise DecodeInputError(f"bench.drafters accepts only {list(DRAFTER_KINDS)}, got {sorted(unknown)}")
    for k, v in drafters.items():
        if v is not None and not Path(str(v)).expanduser().is_dir():
            raise DecodeInputError(f"bench.drafters.{k}: drafter directory {v} does not exist")
    top = (cfg.get("drafter") or {}).get("path") if isinstance(cfg.get("drafter"), Mapping) else None
    if top is not None:  # `drafter=<dir>` fills the bench slot of its kind when that slot is unset
        try:
            kind = drafter_kind(json.loads((Path(str(top)).expanduser() / "config.json").read_text()))
        except (OSError, ValueError) as e:
            raise DecodeInputError(f"drafter {top}: cannot read its config.json ({e})") from None
        if kind in DRAFTER_KINDS and drafters.get(kind) is None:
            drafters[kind] = str(top)
    assistant = b.get("assistant")
    assistant_auto = assistant == "auto"
    if assistant_auto:  # the embedded assistant, when it was built (it only fits the embedded target)
        built = Path(root) / EMBEDDED_ASSISTANT
        assistant = str(built) if (built / "config.json").is_file() else None
    elif assistant is not None and not Path(str(assistant)).expanduser().is_dir():
        raise DecodeInputError(f"bench.assistant: assistant directory {assistant} does not exist")
    n_pl = b.get("prompt_lookup_num_tokens", 10)
    if isinstance(n_pl, bool) or not isinstance(n_pl, int) or n_pl < 1:
        raise DecodeInputError(f"bench.prompt_lookup_num_tokens must be an integer >= 1, got {n_pl!r}")
    warmup = b.get("warmup", 1)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise DecodeInputError(f"bench.warmup must be an integer >= 0, got {warmup!r}")
    _, top_p, top_k = check_sampling(1.0, cfg.get("top_p", 1.0), cfg.get("top_k", 0))
    tcfg = cfg.get("target") or {}
    if not isinstance(tcfg, Mapping):
        tcfg = {"path": tcfg}
    dtype = tcfg.get("dtype", "float32")
    if dtype not in DTYPES:
        raise DecodeInputError(f"target.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    target = tcfg.get("path")
    if not target:
        raise DecodeInputError("target is not set: pass target=<target checkpoint dir>")
    if not Path(str(target)).expanduser().exists():
        raise DecodeInputError(f"target checkpoint directory {target} does not exist; pass target=<dir>")
    return BenchSettings(
        target=str(target), out_dir=str(out_dir), test_urls=[str(u) for u in urls],
        corpus_dir=None if b.get("corpus_dir") is None else str(b["corpus_dir"]),
        outputs_root=str(Path(root) / "outputs"),
        resolutions=_int_list(b.get("resolutions", [64, 128]), "resolutions", 1),
        samples_per_resolution=_int_list(b.get("samples_per_resolution", 8), "samples_per_resolution", 1)[0],
        temperatures=temps,
        max_new_tokens=check_max_new_tokens(b.get("max_new_tokens", 64), "bench.max_new_tokens"),
        methods=methods, drafters={k: drafters.get(k) for k in DRAFTER_KINDS},
        assistant=None if assistant is None else str(assistant), assistant_auto=assistant_auto,
        prompt_lookup_num_tokens=n_pl,
        prompt_lookup_suppress_image_token=bool(b.get("prompt_lookup_suppress_image_token", True)),
        warmup=warmup, top_p=top_p, top_k=top_k, seed=check_seed(cfg.get("seed", 0)),
        tree=check_tree(dict(cfg.get("tree") or {})), dtype=dtype, device=str(cfg.get("device", "cpu")),
    )


# ------------------------------------------------------------------------------------------------- samples
@dataclass
class Sample:
    id: str
    task: str
    question: str
    image: Any  # PIL image at `resolution`
    resolution: int
    native_size: tuple[int, int]
    resized: bool


def expand_urls(urls: Sequence[str]) -> list[str]:
    """Glob patterns are expanded (sorted); other strings (e.g. webdataset brace ranges) are kept as they are."""
    out = []
    for u in urls:
        if any(c in u for c in "*?["):
            out += sorted(glob.glob(os.path.expanduser(u)))
        else:
            out.append(u)
    return out


def _exists(u: str) -> bool:
    return "{" in u or "://" in u or Path(u).expanduser().is_file()


def resolve_test_urls(s: BenchSettings, log=print) -> list[str]:
    urls = [u for u in expand_urls(s.test_urls) if _exists(u)]
    if not urls and s.corpus_dir:
        from ..synthetic.generate import CorpusSpec, ensure_corpus

        log(f"no test shards match {s.test_urls}; generating the synthetic corpus into {s.corpus_dir} (first use)")
        ensure_corpus(s.corpus_dir, CorpusSpec(), log=log)
        urls = [u for u in expand_urls(s.test_urls) if _exists(u)]
    if not urls:
        raise DecodeInputError(f"no test shards found at {s.test_urls}; set bench.test_urls=<held-out shards>")
    return urls


def collect_samples(urls: Sequence[str], resolutions: Sequence[int], n: int) -> list[Sample]:
    """``n`` held-out samples per resolution: the first samples whose image natively has that size, topped up (if
    the split has too few) with the next samples resized to it (bicubic; marked ``resized``)."""
    from PIL import Image

    from ..synthetic.samples import iter_test_samples

    native: dict[int, list] = {r: [] for r in resolutions}
    pool: list = []
    for img, rec in iter_test_samples(list(urls)):
        w, h = img.size
        entry = (img, rec)
        if w == h and w in native and len(native[w]) < n:
            native[w].append(entry)
        else:
            pool.append(entry)
        if all(len(v) >= n for v in native.values()):
            break
    samples = []
    for r in resolutions:
        chosen = [(img, rec, False, img.size) for img, rec in native[r]]
        for img, rec in pool:
            if len(chosen) >= n:
                break
            chosen.append((img.resize((r, r), Image.BICUBIC), rec, True, img.size))
        if len(chosen) < n:
            raise DecodeInputError(f"the test split holds only {len(chosen)} samples; lower "
                                   f"bench.samples_per_resolution (asked {n})")
        for img, rec, resized, size in chosen:
            samples.append(Sample(str(rec.get("id", len(samples))), str((rec.get("tasks") or ["unknown"])[0]),
                                  rec["conversations"][0]["value"], img, r, tuple(size), resized))
    return samples


# --------------------------------------------------------------------------------------------------- helpers
def machine_info(device: str, dtype: str) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "device": device, "dtype": dtype,
        "note": "timings measured side by side in one process on this machine; compare ratios (tau), "
                "not absolute times, across machines",
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _r(x, nd=4):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)


def _tkey(t: float) -> str:
    return str(float(t))


class _Assistant:
    """A small LLaVA assistant for HF assisted decoding that sees its OWN image features (see the module doc)."""

    def __init__(self, path: str, pipe, dtype, device):
        from transformers import AutoProcessor

        from ..target import TargetAdapter

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
                f"{ad.vocab_size}, image token {self.adapter.image_token_id} vs {ad.image_token_id}): {fix}")
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
            for k in ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")}
        self._feats = None
        self._n = 0
        self.injected = 0
        self.kv_len = 0
        self.model.model.register_forward_pre_hook(self._inject, with_kwargs=True)
        self.model.register_forward_hook(self._track)

    def pixels(self, image):
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"]

    def encode(self, pixel_values) -> None:
        self._feats = self.adapter.encode_images(pixel_values)
        self._n = sum(int(f.shape[0]) for f in self._feats)
        self.injected = 0
        self.kv_len = 0

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


# -------------------------------------------------------------------------------------------------- runner
class _Runner:
    def __init__(self, s: BenchSettings, log):
        import torch

        from ..drafter.eagle import EagleVLMDrafter
        from .pipeline import SpecVLMPipeline

        self.s, self.log = s, log
        self.torch = torch
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []
        self.base = SpecVLMPipeline(s.target, None, dtype=s.dtype, device=s.device, tree=s.tree)
        self.adapter = self.base.adapter
        fingerprint = self.adapter.fingerprint()
        self.drafter_paths: dict[str, str | None] = {}
        self.pipes = {}
        # Each drafter kind is loaded once; its static and adaptive rows share it.
        needed = {drafter_of(m) for m in SPEC_METHODS if m in s.methods}
        loaded: dict[str, tuple[str, Any]] = {}
        for m in DRAFTER_KINDS:
            if m not in needed:
                continue
            path = s.drafters.get(m)
            if path is None:
                cands = find_exported_drafters(s.outputs_root, m) if s.outputs_root else []
                found = pick_drafter(cands, fingerprint)
                if found is None:
                    what = "no compressor" if m == "eaglevlm" else "compressor=select"
                    why = (f"found {len(cands)} exported {m} drafter(s) but none for this target (fingerprint "
                           f"{fingerprint})") if cands else f"no exported {m} drafter ({what})"
                    train = "compressor=none" if m == "eaglevlm" else "compressor=select"
                    self.skipped[m] = (f"{why} under {s.outputs_root}; run `python train.py {train}` or pass "
                                       f"bench.drafters.{m}=<drafter dir>")
                    continue
                path = str(found)
            drafter = EagleVLMDrafter.load(path, target=self.adapter, dtype=self.base.adapter.dtype,
                                           device=s.device)
            kind = drafter_kind({"compressor": drafter.config.compressor})
            if kind != m:
                self.notes.append(f"{m}: the drafter at {path} is of kind {kind!r}, not {m!r}")
            loaded[m] = (str(path), drafter)
        for row in SPEC_METHODS:
            if row not in s.methods:
                continue
            kind = drafter_of(row)
            if kind not in loaded:
                self.skipped[row] = self.skipped[kind]
                continue
            path, drafter = loaded[kind]
            tree = s.tree if row == kind else {**s.tree, "adaptive": True}
            self.pipes[row] = SpecVLMPipeline.from_components(self.adapter, self.base.processor, drafter, tree=tree)
            self.drafter_paths[row] = path
        self.assistant = None
        if "assisted" in s.methods:
            if s.assistant is None:
                self.skipped["assisted"] = (
                    "no assistant: set bench.assistant=<dir of a small LLaVA that shares the target's tokenizer>, "
                    "or build the embedded one: python -m specvlm_lit.embedded.build --config-name assistant_recipe")
            else:
                try:
                    self.assistant = _Assistant(s.assistant, self.base, self.adapter.dtype, s.device)
                except DecodeInputError as e:
                    if not s.assistant_auto:
                        raise
                    self.skipped["assisted"] = f"the embedded assistant does not fit this target: {e}"
        self.image_token_id = self.adapter.image_token_id

    # one timed run -> record
    def run(self, method: str, inputs, a_pixels, warp, seed, *, ttft: bool = True) -> dict:
        s, pipe = self.s, self.base
        rec: dict[str, Any] = {}
        if method in SPEC_METHODS:
            p = self.pipes[method]
            t0 = time.perf_counter()
            res = p.decode(inputs, max_new_tokens=s.max_new_tokens, warp=warp, seed=seed)
            rec["time_s"] = time.perf_counter() - t0
            st = res.stats
            rec.update(tokens=res.tokens.tolist(), new_tokens=st.new_tokens, target_forwards=st.rounds,
                       ttft_s=st.time_prefill, drafter_visual_tokens=st.draft_visual_tokens,
                       draft_kv=st.draft_kv_len, draft_kv_bytes=st.draft_kv_len * p.draft_kv_bytes_per_row(),
                       verify_rounds=st.verify_rounds, time_draft_s=st.time_draft, time_verify_s=st.time_verify,
                       time_other_s=st.time_other, tree_nodes=sum(st.tree_sizes),
                       tree_depth=sum(st.tree_depths))
            return rec
        kwargs: dict[str, Any] = {}
        extra = None
        if method == "prompt_lookup":
            kwargs["prompt_lookup_num_tokens"] = s.prompt_lookup_num_tokens
            if s.prompt_lookup_suppress_image_token:
                kwargs["suppress_tokens"] = [self.image_token_id]
        elif method == "assisted":
            asst = self.assistant

            def extra():
                asst.encode(a_pixels)
                return {"assistant_model": asst.model}
        tokens, elapsed, counter = pipe.hf_generate(inputs, max_new_tokens=s.max_new_tokens, warp=warp, seed=seed,
                                                    prepare_extra=extra, **kwargs)
        n = len(tokens)
        rec.update(tokens=tokens, new_tokens=n, target_forwards=counter.calls, time_s=elapsed)
        if method == "ar":
            rec.update(drafter_visual_tokens=None, draft_kv=None, draft_kv_bytes=None)
        elif method == "prompt_lookup":
            rec.update(drafter_visual_tokens=0, draft_kv=0, draft_kv_bytes=0)  # an n-gram lookup: no model, no KV
        else:
            asst = self.assistant
            c = asst.model.config.get_text_config()
            heads = int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
            head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
            per_row = 2 * int(c.num_hidden_layers) * heads * head_dim * asst.adapter.embed_tokens.weight.element_size()
            rec.update(drafter_visual_tokens=asst._n if asst.injected else 0, draft_kv=asst.kv_len,
                       draft_kv_bytes=asst.kv_len * per_row, assistant_saw_image=bool(asst.injected))
        if ttft:
            _, t1, _ = pipe.hf_generate(inputs, max_new_tokens=1, warp=warp, seed=seed, prepare_extra=extra, **kwargs)
            rec["ttft_s"] = t1
        return rec


def _aggregate(runs: list[dict], ar: dict, greedy: bool) -> dict:
    """Aggregate the runs of one method (all at one temperature); ``ar`` maps sample key -> AR run."""
    ok = [r for r in runs if "error" not in r and r["key"] in ar]
    if not ok:
        return {"n": 0, "tau": None, "sigma": None, "tokens_per_s": None, "ttft_ms": None, "identical": None}
    t = sum(r["time_s"] for r in ok)
    t_ar = sum(ar[r["key"]]["time_s"] for r in ok)
    new = sum(r["new_tokens"] for r in ok)
    fw = sum(r["target_forwards"] for r in ok)
    ttft = _mean([r.get("ttft_s") for r in ok])
    out = {
        "n": len(ok),
        "tau": _r(t_ar / t if t > 0 else None),
        "sigma": _r(new / fw if fw else None),
        "tokens_per_s": _r(new / t if t > 0 else None, 2),
        "ttft_ms": _r(None if ttft is None else 1000 * ttft, 2),
        "identical": _r(sum(r["tokens"] == ar[r["key"]]["tokens"] for r in ok) / len(ok)) if greedy else None,
        "drafter_visual_tokens": _r(_mean([r.get("drafter_visual_tokens") for r in ok]), 2),
        "target_visual_tokens": _r(_mean([r.get("target_visual_tokens") for r in ok]), 2),
        "draft_kv": _r(_mean([r.get("draft_kv") for r in ok]), 2),
        "draft_kv_bytes": _r(_mean([r.get("draft_kv_bytes") for r in ok]), 1),
        "new_tokens_mean": _r(new / len(ok), 2),
        "time_s": _r(t, 4),
    }
    if any("verify_rounds" in r for r in ok):
        vr = sum(r["verify_rounds"] for r in ok)
        out["accept_length"] = _r((new - len(ok)) / vr if vr else None)
        out["breakdown"] = _breakdown(ok, ar, vr)
    return out


def _breakdown(runs: list[dict], ar: dict, rounds: int) -> dict:
    """Where a speculative method's time goes, next to what one AR decoding step costs.

    Per request: prefill (image + target prefill + first token). Per verification round: draft (tree
    drafting + draft-cache extension), verify (target tree forward + acceptance + KV compaction) and
    other (bookkeeping); ``pipeline`` is the share spent outside the decoder. ``ar_step_ms`` is the AR baseline's time per token after its first, on the same
    prompts: a round pays off when it emits more tokens than ``round_ms / ar_step_ms``.
    """
    per = lambda key, n: _r(1000 * sum(r[key] for r in runs) / n, 2) if n else None  # noqa: E731
    ar_runs = [ar[r["key"]] for r in runs]
    ar_decode_s = sum(a["time_s"] - (a.get("ttft_s") or 0.0) for a in ar_runs)
    ar_steps = sum(max(a["new_tokens"] - 1, 0) for a in ar_runs)
    total = sum(r["time_s"] for r in runs)
    parts = {"prefill": sum(r["ttft_s"] for r in runs), "draft": sum(r["time_draft_s"] for r in runs),
             "verify": sum(r["time_verify_s"] for r in runs), "other": sum(r["time_other_s"] for r in runs)}
    # The pipeline's own work around the decoder (image preprocessing, tokenisation, result assembly).
    parts["pipeline"] = max(0.0, total - sum(parts.values()))
    return {
        "rounds": rounds,
        "prefill_ms_per_request": per("ttft_s", len(runs)),
        "draft_ms_per_round": per("time_draft_s", rounds),
        "verify_ms_per_round": per("time_verify_s", rounds),
        "other_ms_per_round": per("time_other_s", rounds),
        "round_ms": _r(1000 * (parts["draft"] + parts["verify"] + parts["other"]) / rounds, 2) if rounds else None,
        "tree_nodes_per_round": _r(sum(r["tree_nodes"] for r in runs) / rounds, 2) if rounds else None,
        "tree_depth_per_round": _r(sum(r["tree_depth"] for r in runs) / rounds, 2) if rounds else None,
        "ar_step_ms": _r(1000 * ar_decode_s / ar_steps, 2) if ar_steps else None,
        "share": {k: _r(v / total, 3) if total > 0 else None for k, v in parts.items()},
    }


def _summarise(method_runs: list[dict], ar: dict, greedy: bool) -> dict:
    agg = _aggregate(method_runs, ar, greedy)
    for key, field_name in (("per_task", "task"), ("per_resolution", "resolution")):
        groups: dict[str, list] = defaultdict(list)
        for r in method_runs:
            groups[str(r[field_name])].append(r)
        agg[key] = {g: {k: v for k, v in _aggregate(rs, ar, greedy).items()
                        if k in ("n", "tau", "sigma", "tokens_per_s", "ttft_ms", "identical",
                                 "drafter_visual_tokens", "draft_kv")}
                    for g, rs in sorted(groups.items(), key=lambda kv: (len(kv[0]), kv[0]))}
    errors = [r["error"] for r in method_runs if "error" in r]
    if errors:
        agg["errors"] = sorted(set(errors))[:5]
        agg["n_errors"] = len(errors)
    return agg


# ------------------------------------------------------------------------------------------------- outputs
def _fmt(v, nd=2, pct=False):
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.0f}%"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def write_markdown(report: dict, path: Path) -> None:
    m, cfg = report["machine"], report["config"]
    lines = ["# SpecVLM decoding benchmark", "",
             f"Machine: {m['cpu'] or m['machine']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch threads), "
             f"{m['platform']}, torch {m['torch']}, transformers {m['transformers']}, device {m['device']}, "
             f"dtype {m['dtype']}. {m['note']}.", "",
             f"Target `{cfg['target']}`; {cfg['samples_per_resolution']} held-out samples per resolution at "
             f"{', '.join(str(r) for r in cfg['resolutions'])} px; max_new_tokens {cfg['max_new_tokens']}; "
             f"tree {cfg['tree']}.", ""]
    methods = list(report["results"])
    for t in cfg["temperatures"]:
        tk = _tkey(t)
        lines += [f"## T = {t:g}", "",
                  "| method | tau (speedup vs AR) | sigma | tokens/s | TTFT ms | identical to AR | drafter visual "
                  "tokens | draft KV rows | n |", "|---|---|---|---|---|---|---|---|---|"]
        tasks: set[str] = set()
        for meth in methods:
            r = report["results"][meth].get(tk, {})
            if "skipped" in r:
                lines.append(f"| {LABELS[meth]} | skipped: {r['skipped']} | | | | | | | |")
                continue
            tasks |= set(r.get("per_task", {}))
            lines.append(f"| {LABELS[meth]} | {_fmt(r.get('tau'))} | {_fmt(r.get('sigma'))} | "
                         f"{_fmt(r.get('tokens_per_s'), 1)} | {_fmt(r.get('ttft_ms'), 1)} | "
                         f"{_fmt(r.get('identical'), pct=True)} | {_fmt(r.get('drafter_visual_tokens'), 1)} | "
                         f"{_fmt(r.get('draft_kv'), 1)} | {r.get('n', 0)} |")
        if tasks:
            order = sorted(tasks)
            lines += ["", f"Per task type at T = {t:g} (tau / sigma):", "",
                      "| method | " + " | ".join(order) + " |", "|---" * (len(order) + 1) + "|"]
            for meth in methods:
                r = report["results"][meth].get(tk, {})
                if "skipped" in r:
                    continue
                cells = []
                for task in order:
                    pt = r.get("per_task", {}).get(task)
                    cells.append(f"{_fmt(pt.get('tau'))} / {_fmt(pt.get('sigma'))}" if pt else "-")
                lines.append(f"| {LABELS[meth]} | " + " | ".join(cells) + " |")
        spec = [(meth, report["results"][meth].get(tk, {}).get("breakdown")) for meth in methods]
        spec = [(meth, b) for meth, b in spec if b]
        if spec:
            lines += ["", f"Where the time goes at T = {t:g} (ms; shares of the method's total wall time):", "",
                      "| method | prefill / request | draft / round | verify / round | other / round | round | "
                      "tree nodes / round | tree depth / round | AR step | prefill % | draft % | verify % | other % | "
                      "pipeline % |", "|---" * 14 + "|"]
            for meth, b in spec:
                sh = b["share"]
                lines.append(f"| {LABELS[meth]} | {_fmt(b['prefill_ms_per_request'], 1)} | "
                             f"{_fmt(b['draft_ms_per_round'], 1)} | {_fmt(b['verify_ms_per_round'], 1)} | "
                             f"{_fmt(b['other_ms_per_round'], 1)} | {_fmt(b['round_ms'], 1)} | "
                             f"{_fmt(b['tree_nodes_per_round'], 1)} | {_fmt(b['tree_depth_per_round'], 1)} | "
                             f"{_fmt(b['ar_step_ms'], 1)} | "
                             + " | ".join(_fmt(sh[k], pct=True) for k in ("prefill", "draft", "verify", "other", "pipeline")) + " |")
        lines.append("")
    lines += ["## Definitions", "",
              "- tau = sum of AR wall times / sum of the method's wall times on the same prompts (image encoding "
              "included everywhere).",
              "- sigma = new tokens / target forwards that produced them (speculative: prefill + verifications).",
              "- TTFT: HF methods = a max_new_tokens=1 call on the same input; speculative = its prefill.",
              "- identical = fraction of greedy outputs token-identical to the AR output (T = 0 only).", ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = report["config"]["temperatures"]
    methods = list(report["results"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(len(temps), 1)
    for ax, key, title in ((axes[0], "tau", "speedup tau vs AR (same prompts)"),
                           (axes[1], "sigma", "sigma: tokens per target forward")):
        for i, t in enumerate(temps):
            xs, ys = [], []
            for j, m in enumerate(methods):
                r = report["results"][m].get(_tkey(t), {})
                x = j + (i - (len(temps) - 1) / 2) * width
                v = r.get(key)
                if v is None:
                    ax.text(x, 0.02, "skipped" if "skipped" in r else "n/a", rotation=90, ha="center",
                            va="bottom", fontsize=7, color="grey")
                    continue
                xs.append(x)
                ys.append(v)
            bars = ax.bar(xs, ys, width=width, label=f"T = {t:g}")
            for b_, y in zip(bars, ys):
                ax.text(b_.get_x() + b_.get_width() / 2, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([LABELS[m] for m in methods], rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(f"{m['cpu'] or m['machine']}, {m['torch_threads']} threads, {m['device']} {m['dtype']}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main
def run_benchmark(s: BenchSettings, *, progress: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """Run the benchmark described by ``s``; write bench.json / bench.md / bench.png into ``s.out_dir``."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out_dir = Path(s.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    urls = resolve_test_urls(s, log)
    samples = collect_samples(urls, s.resolutions, s.samples_per_resolution)

    import torch
    import transformers
    from tqdm.auto import tqdm

    from .acceptance import WarpConfig

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # HF repeats a deprecation warning inside every assistant call
    try:
        runner = _Runner(s, log)
        machine = machine_info(s.device, s.dtype)
        pipe = runner.base
        prepared = []
        for smp in samples:
            inp = pipe.prepare(smp.image, smp.question)
            a_px = runner.assistant.pixels(smp.image) if runner.assistant is not None else None
            prepared.append((smp, inp, a_px))
        active = [m for m in s.methods if m not in runner.skipped]
        per_t_runs = len(prepared) * len(active) + s.warmup * len(active)
        runs: list[dict] = []
        skipped_t: dict[tuple[str, str], str] = {}
        bar = tqdm(total=per_t_runs * len(s.temperatures), desc="bench", unit="run", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        with torch.no_grad():
            for t in s.temperatures:
                warp = WarpConfig(temperature=t, top_k=s.top_k, top_p=s.top_p)
                tk = _tkey(t)
                # warm-up (untimed): first sample, every method; a method failing here is skipped at this T
                for m in active:
                    for w in range(s.warmup):
                        bar.set_postfix_str(f"T={t:g} warm-up {m}")
                        smp, inp, a_px = prepared[0]
                        try:
                            runner.run(m, inp, a_px, warp, s.seed, ttft=False)
                        except Exception as e:  # noqa: BLE001 - reported, not hidden
                            skipped_t[(m, tk)] = f"failed in transformers {transformers.__version__}: " \
                                                 f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                        bar.update(1)
                for i, (smp, inp, a_px) in enumerate(prepared):
                    seed = None if s.seed is None else s.seed + i
                    for m in active:
                        bar.set_postfix_str(f"T={t:g} {smp.resolution}px {m}")
                        base = {"method": m, "temperature": t, "resolution": smp.resolution, "sample": smp.id,
                                "task": smp.task, "key": i, "target_visual_tokens": inp.n_visual,
                                "prompt_len": inp.prompt_len}
                        if (m, tk) in skipped_t:
                            bar.update(1)
                            continue
                        try:
                            rec = runner.run(m, inp, a_px, warp, seed)
                        except Exception as e:  # noqa: BLE001
                            rec = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
                        runs.append({**base, **rec})
                        bar.update(1)
        bar.close()

        results: dict[str, dict] = {}
        for m in s.methods:
            results[m] = {}
            for t in s.temperatures:
                tk = _tkey(t)
                if m in runner.skipped:
                    results[m][tk] = {"skipped": runner.skipped[m]}
                    continue
                if (m, tk) in skipped_t:
                    results[m][tk] = {"skipped": skipped_t[(m, tk)]}
                    continue
                ar = {r["key"]: r for r in runs if r["method"] == "ar" and r["temperature"] == t and "error" not in r}
                mr = [r for r in runs if r["method"] == m and r["temperature"] == t]
                results[m][tk] = _summarise(mr, ar, greedy=(t == 0.0))

        notes = list(runner.notes)
        if "prompt_lookup" in s.methods and s.prompt_lookup_suppress_image_token:
            notes.append("HF prompt lookup runs with suppress_tokens=[image token]: unfiltered, its 1-gram match of "
                         "':' (from 'USER:') proposes the image placeholders, and HF's first verification forward "
                         "then fails in LLaVA ('Image features and image tokens do not match')")
        if runner.assistant is not None:
            a = runner.assistant
            notes.append(f"HF assisted: assistant {a.path} gets its own image features via a forward pre-hook "
                         f"(transformers {transformers.__version__} drops mm_encoder_outputs / pixel_values from the "
                         f"assistant's prefill); HF assistant defaults {a.generation_defaults}")
            blind = [r for r in runs if r["method"] == "assisted" and r.get("assistant_saw_image") is False]
            if blind:
                notes.append(f"HF assisted: in {len(blind)} run(s) the assistant did not receive image features")
        if any(smp.resized for smp in samples):
            notes.append("some samples were resized to reach samples_per_resolution native-size samples "
                         "(marked resized in samples)")
        sizes = sorted({(smp.resolution, inp.image_size, inp.n_visual) for smp, inp, _ in prepared})
        notes.append("processed image size / target visual tokens per resolution: "
                     + "; ".join(f"{r}px -> {w}x{h} / {n}" for r, (w, h), n in sizes))
        if hasattr(os, "getloadavg"):
            machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

        config = asdict(s)
        config.update(test_urls_resolved=urls, drafter_paths=runner.drafter_paths,
                      assistant_generation_defaults=(runner.assistant.generation_defaults
                                                     if runner.assistant is not None else None))
        report = {
            "machine": machine,
            "config": config,
            "results": results,
            "samples": [{"id": smp.id, "task": smp.task, "resolution": smp.resolution, "resized": smp.resized,
                         "native_size": list(smp.native_size),
                         "processed_size": list(inp.image_size), "target_visual_tokens": inp.n_visual,
                         "prompt_len": inp.prompt_len} for smp, inp, _ in prepared],
            "runs": [{k: (_r(v, 6) if isinstance(v, float) else v) for k, v in r.items() if k != "tokens"}
                     for r in runs],
            "notes": notes,
        }
    finally:
        transformers.logging.set_verbosity(verbosity)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    write_markdown(report, out_dir / "bench.md")
    write_plot(report, out_dir / "bench.png")
    return out_dir
