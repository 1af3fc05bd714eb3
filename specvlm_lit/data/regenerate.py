"""``python -m specvlm_lit.data.regenerate``: re-answer every user turn of training shards with the frozen target.

    python -m specvlm_lit.data.regenerate 'data/llava665k/train-{000000..000665}.tar' --target /models/llava \\
        --out data/llava665k_regen [--drafter outputs/train/runs/<run>/drafter] [--temperature 0] [--batch-size 8]

Drafters accept more when they learn the target's own answers rather than the dataset's (EAGLE, HASS and Medusa
regenerate). This writes a copy of the input shards (the converter's, the synthetic corpus or any shards the loader
reads) in which every assistant turn is what the target answers there, with the same images, through the
converter's shard writer (``convert_output.ShardOutput``): the same layout, rejects file, manifest and
byte-identical resume. The manifest's ``job`` is the provenance: the inputs and their sha256, the sha256 of the
manifest they came with, the target's path and fingerprint, the drafter (if any) and every decoding setting.

Multi-turn conversations: turn ``k`` is answered with the *regenerated* turns ``0..k-1`` as its context, so every
sample is a conversation the target could have had (what the drafter sees when it drafts for the target in a chat);
keeping the dataset's earlier answers would train on contexts the target never produces. Every user turn is answered,
a trailing unanswered one too.

Prompts are the target's own (``adapter.render_prompt``: the checkpoint's chat template with its generation prompt,
its image processing, the visual-token layouts the speculative decoder's compressor needs), so any supported family's
checkpoint directory works as ``--target``; nothing here knows a family.

Decoding: without ``--drafter``, the target's own Hugging Face ``generate()`` on batches of ``--batch-size`` samples
(left-padded; ``--batch-size 1`` is exactly ``generate()`` per prompt). With ``--drafter``, this project's lossless
speculative decoder (batch size 1): token-identical to ``generate()`` when greedy, distributed like it when sampling.
Sampling is seeded per (``--seed``, batch, turn), so a rerun and a resumed run draw the same answers.

An answer is kept only when the target ends it (EOS within ``--max-new-tokens``): an answer cut short would teach the
drafter an end the target never emits. Such samples, and samples the loader cannot read, are listed in
``rejects.jsonl`` with a reason (:data:`REASONS`); nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..utils.atomic import check_replaceable
from .conversation import IMAGE_PLACEHOLDER, ConversationError, normalise
from .convert import Progress
from .convert_inputs import sha256_file
from .convert_output import KIND, ShardOutput, run_cli
from .convert_samples import sample_key
from .shards import SampleSkip, batch_visuals, image_members, rendering_skips, sample_visual
from .sources import check_shards, is_remote, local_path

#: Why a sample was not regenerated (rejects.jsonl). The names shared with ``skips.SKIP_REASONS`` and
#: ``convert_samples.REASONS`` mean what they mean there.
REASONS = {
    "corrupt_tar": "the input shard cannot be read past this point",
    "missing_json": "the sample has no .json member",
    "bad_json": "the .json member is not a JSON object",
    "bad_conversation": "no conversation, bad roles or turn order, or <image> placeholders that do not match",
    "missing_image": "an image member the json names is missing",
    "corrupt_image": "an image cannot be decoded",
    "image_too_small": "an image is smaller than one patch of the target",
    "too_long": "a prompt plus --max-new-tokens does not fit the target's context",
    "answer_unfinished": "the target did not end an answer within --max-new-tokens",
    "empty_answer": "the target answered a turn with nothing (EOS first)",
    "image_token_in_answer": "the target's answer holds the image placeholder",
}
#: Notes counted in the manifest (``counts.notes``): kept samples with something worth knowing.
RETOKENIZED = "answers_retokenized_differently"
#: Bump when the output changes for the same job.
REGENERATOR_VERSION = 1
log = logging.getLogger(__name__)


class RegenerateError(UserError):
    """A bad argument or input of ``python -m specvlm_lit.data.regenerate``."""


# ---------------------------------------------------------------------------------------------------- inputs
@dataclass
class Sample:
    """One input sample: where it came from, its members, and (once parsed) its turns and images."""

    ordinal: int
    shard: str
    index: int  # position in its shard
    raw: dict
    record: dict | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)  # user turns with the answers regenerated so far
    questions: list[str] = field(default_factory=list)
    images: list[tuple[str, bytes]] = field(default_factory=list)  # the members, written out as they are
    pictures: list = field(default_factory=list)  # the same images decoded (PIL), for the prompt builder
    reject: tuple[str, str] | None = None
    retokenized: bool = False

    @property
    def id(self) -> str:
        rid = self.record.get("id") if isinstance(self.record, dict) else None
        return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else f"{self.shard}#{self.index}"


def iter_samples(shards: list[str], encoder) -> Iterator[tuple[int, str, int, dict | None]]:
    """``(shard number, shard name, index in shard, raw sample)`` in shard order, read by the training loader's
    shard reader (``shards.read_shards``); a shard that cannot be read to its end yields ``None`` once at the break
    (rejected as ``corrupt_tar``; the incomplete sample there is part of it)."""
    from .shards import read_shards

    for number, url in enumerate(shards):
        name = url.rsplit("/", 1)[-1]
        index = 0
        for item in read_shards(encoder)(iter([{"url": url}])):
            if "stats_only" not in item:
                yield number, name, index, item
                index += 1
            elif item["stats"].get("corrupt_tar"):
                yield number, name, index, None


def describe_inputs(shards: list[str]) -> tuple[list[dict], list[dict]]:
    """The inputs (url, sha256 of local shards) and the sha256 of every manifest.json next to them."""
    inputs, manifests = [], {}
    for url in shards:
        if is_remote(url):
            inputs.append({"url": url, "sha256": None})
            continue
        path = local_path(url)
        inputs.append({"url": str(path), "sha256": sha256_file(path)})
        manifest = path.parent / "manifest.json"
        if manifest.is_file() and str(manifest) not in manifests:
            manifests[str(manifest)] = {"path": str(manifest), "sha256": sha256_file(manifest)}
    return inputs, list(manifests.values())


def _dir_hash(path: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        if (path / name).is_file():
            h.update(name.encode() + sha256_file(path / name).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- decoding
@dataclass(frozen=True)
class Decoding:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_new_tokens: int = 256
    batch_size: int = 8

    def as_dict(self, method: str) -> dict:
        return {"method": method, **self.__dict__}


class Regenerator:
    """Answers batches of samples turn by turn with the target (HF ``generate()``) or the speculative decoder.

    Prompts are the target's own (``adapter.render_prompt``: its chat template with the generation prompt, its image
    processing and visual-token layouts), and each answer is stored as the text whose training encoding
    (``render_conversation``, what the loader reads) gives back the target's tokens."""

    def __init__(self, target: str, drafter: str | None, decoding: Decoding, *, dtype: str, device: str):
        import torch

        from ..decoding.pipeline import SpecVLMPipeline, check_sampling, hf_sampling_kwargs
        from .shards import SampleEncoder

        self.torch = torch
        self.decoding = decoding
        self.warp = check_sampling(decoding.temperature, decoding.top_p, decoding.top_k)
        self.hf_kwargs = hf_sampling_kwargs(decoding.temperature, decoding.top_p, decoding.top_k)
        self.pipe = SpecVLMPipeline(target, drafter, dtype=dtype, device=device)
        self.adapter, self.tokenizer = self.pipe.adapter, self.pipe.tokenizer
        self.visual_token_ids = set(self.adapter.visual_token_ids)
        self.method = "speculative" if drafter else "generate"
        self.generated_tokens = 0
        self.encoder = SampleEncoder(self.pipe.processor, None)  # the training loader's reading of a sample

    # ------------------------------------------------------------------------------------------ samples
    def parse(self, sample: Sample) -> None:
        """Read the sample's conversation and images; sets ``sample.reject`` when the loader could not use it."""
        raw = sample.raw
        if "json" not in raw:
            sample.reject = ("missing_json", f"no .json member (members: {sorted(raw)})")
            return
        try:
            record = json.loads(raw["json"])
        except ValueError as e:
            sample.reject = ("bad_json", str(e))
            return
        if not isinstance(record, dict):
            sample.reject = ("bad_json", f"the .json holds a {type(record).__name__}, not an object")
            return
        sample.record = record
        try:
            turns = normalise(record.get("conversations"))
            sample.images = image_members(raw, record)
            sample.pictures = self.encoder.open_images(raw, record)
        except SampleSkip as e:
            sample.reject = (e.reason, str(e.detail))
            return
        except ConversationError as e:
            sample.reject = (e.reason, str(e))
            return
        sample.questions = [text for role, text in turns if role == "user"]
        if any(IMAGE_PLACEHOLDER in text for role, text in turns if role == "assistant"):
            sample.reject = ("bad_conversation", f"an assistant turn holds an {IMAGE_PLACEHOLDER} placeholder")
            return
        if sum(q.count(IMAGE_PLACEHOLDER) for q in sample.questions) != len(sample.pictures):
            sample.reject = (
                "bad_conversation",
                f"{len(sample.pictures)} image(s) but a different number of placeholders",
            )

    @staticmethod
    def _messages(turns: list[tuple[str, str]]) -> list[dict]:
        """Turns as chat messages; their ``<image>`` placeholders are the prompt builder's to place."""
        return [{"role": role, "content": text} for role, text in turns]

    def _images_of(self, sample: Sample, turns: list[tuple[str, str]]) -> list:
        """The sample's images shown by ``turns`` (placeholders take the images in order)."""
        return sample.pictures[: sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns if role == "user")]

    def _prompt(self, sample: Sample, question: str):
        """The target's generation prompt for the conversation so far + ``question``: a ``PromptInputs``."""
        turns = [*sample.turns, ("user", question)]
        with rendering_skips():
            return self.adapter.render_prompt(self._messages(turns), self._images_of(sample, turns))

    # ------------------------------------------------------------------------------------------ answers
    def answer_batch(self, samples: list[Sample], chunk_start: int) -> None:
        """Regenerate every turn of ``samples`` (already parsed, not rejected), turn by turn."""
        turn = 0
        while True:
            active = [s for s in samples if s.reject is None and turn < len(s.questions)]
            if not active:
                return
            prompts = []
            for s in active:
                try:
                    prompt = self._prompt(s, s.questions[turn])
                except SampleSkip as e:
                    s.reject = (e.reason, f"turn {turn}: {e.detail}")
                    continue
                except ConversationError as e:
                    s.reject = (e.reason, f"turn {turn}: {e}")
                    continue
                n = prompt.input_ids.shape[1]
                if n + self.decoding.max_new_tokens > self.adapter.context_length:
                    s.reject = (
                        "too_long",
                        f"turn {turn}: {n} prompt tokens + --max-new-tokens {self.decoding.max_new_tokens} > "
                        f"the target's context {self.adapter.context_length}",
                    )
                    continue
                prompts.append((s, prompt))
            seed = hash_seed(self.decoding.seed, chunk_start, turn)
            if self.method == "generate":
                outputs = self._generate_batch([p for _, p in prompts], seed)
            else:
                outputs = [self._speculative(p, hash_seed(seed, s.ordinal)) for s, p in prompts]
            for (s, _), tokens in zip(prompts, outputs):
                self._take_answer(s, turn, tokens)
            turn += 1

    def _generate_batch(self, prompts: list, seed: int) -> list[list[int]]:
        torch = self.torch
        if not prompts:
            return []
        ad, pad = self.adapter, self.pipe.pad_token_id
        width = max(p.input_ids.shape[1] for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            n = p.input_ids.shape[1]
            input_ids[row, width - n :], attention[row, width - n :] = p.input_ids[0], 1
        visual = batch_visuals([sample_visual(p.visual) for p in prompts])  # placeholder order, row by row
        kwargs = dict(self.hf_kwargs)
        kwargs.update(ad.hf_generate_inputs(input_ids, visual or None))  # the family's image inputs ([]: none)
        if kwargs.get("do_sample"):
            torch.manual_seed(seed)
        with torch.no_grad():
            out = ad.model.generate(
                input_ids=input_ids.to(ad.device),
                attention_mask=attention.to(ad.device),
                max_new_tokens=self.decoding.max_new_tokens,
                eos_token_id=self.pipe.eos_token_id,
                pad_token_id=pad,
                **kwargs,
            )
        return [row[width:].tolist() for row in out.cpu()]

    def _speculative(self, prompt, seed: int) -> list[int]:
        torch = self.torch
        generator = None
        if not self.warp.greedy:
            generator = torch.Generator(device=self.adapter.device).manual_seed(seed)
        res = self.pipe.decoder(self.warp).generate(
            prompt.input_ids,
            pixel_values=prompt.visual,
            max_new_tokens=self.decoding.max_new_tokens,
            eos_token_id=self.pipe.eos_token_id,
            generator=generator,
            image_layouts=prompt.layouts,
        )
        return res.tokens.tolist()

    def _take_answer(self, sample: Sample, turn: int, tokens: list[int]) -> None:
        eos = self.pipe.eos_token_id
        if eos not in tokens:
            sample.reject = ("answer_unfinished", f"turn {turn}: no EOS within {len(tokens)} tokens")
            return
        answer = tokens[: tokens.index(eos)]
        self.generated_tokens += len(answer) + 1
        if not answer:
            sample.reject = ("empty_answer", f"turn {turn}: the target answered EOS first")
            return
        if self.visual_token_ids.intersection(answer):
            sample.reject = ("image_token_in_answer", f"turn {turn}: the answer holds a visual placeholder token")
            return
        text = self.tokenizer.decode(answer, skip_special_tokens=False)
        if not text.strip():
            sample.reject = ("empty_answer", f"turn {turn}: the target answered only whitespace")
            return
        value, exact = self._stored_answer(sample, sample.questions[turn], text, answer + [eos])
        sample.retokenized |= not exact
        sample.turns += [("user", sample.questions[turn]), ("assistant", value)]

    def _stored_answer(self, sample: Sample, question: str, text: str, tokens: list[int]) -> tuple[str, bool]:
        """The answer text to store and whether its training encoding (``render_conversation``, as the loader reads
        the sample) learns exactly ``tokens`` (the answer, then EOS) in this turn.

        A format may put its own space before an answer (LLaVA-1.5: ``" ASSISTANT:" + " " + answer``), so the
        target's first token carries that space: the text without it is tried first, then the text as it is. When
        neither gives the tokens back (a tokenizer that encodes the text differently), the one whose encoding still
        reads as the target's text is kept."""
        candidates = ([text[1:]] if text.startswith(" ") else []) + [text]
        expected = self.tokenizer.decode(tokens, skip_special_tokens=False)
        same_text = None
        for value in candidates:
            turns = [*sample.turns, ("user", question), ("assistant", value)]
            try:
                with rendering_skips():
                    enc = self.adapter.render_conversation(self._messages(turns), self._images_of(sample, turns))
            except (SampleSkip, ConversationError):
                break
            # the format's own end-of-turn text may follow the EOS in the turn (ChatML: a newline)
            learned = last_learned_turn(enc.input_ids[0], enc.loss_mask[0])
            if learned[: len(tokens)] == tokens:
                return value, True
            if same_text is None and self.tokenizer.decode(learned, skip_special_tokens=False).startswith(expected):
                same_text = value
        return (candidates[-1] if same_text is None else same_text), False


def last_learned_turn(input_ids, loss_mask) -> list[int]:
    """The tokens of the last run of learned positions: a conversation's final assistant turn."""
    learned = loss_mask.nonzero().flatten().tolist()
    if not learned:
        return []
    end = start = learned[-1] + 1
    while start > 0 and bool(loss_mask[start - 1]):
        start -= 1
    return input_ids[start:end].tolist()


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def members_of(sample: Sample, key: str) -> tuple[tuple[str, bytes], ...]:
    """The output sample: the json with the regenerated conversation and the images, renamed to ``key``."""
    n = len(sample.images)
    exts = [ext.rsplit(".", 1)[-1] for ext, _ in sample.images]
    names = exts if n == 1 else [f"{i}.{ext}" for i, ext in enumerate(exts)]
    record = dict(sample.record)
    record.pop("image", None)  # a LLaVA-style name of the source member, renamed below
    record["images"] = [f"{key}.{name}" for name in names]
    record["conversations"] = [{"from": "human" if r == "user" else "gpt", "value": t} for r, t in sample.turns]
    record["regenerated_from"] = {"shard": sample.shard, "key": sample.raw.get("__key__")}
    data = json.dumps(record, ensure_ascii=False).encode("utf-8")
    return (("json", data), *((name, img) for name, (_, img) in zip(names, sample.images)))


# ---------------------------------------------------------------------------------------------------- driver
def _check_args(decoding: Decoding, samples_per_shard: int, limit: int | None, split: str) -> None:
    for name, value, low in (
        ("--max-new-tokens", decoding.max_new_tokens, 1),
        ("--batch-size", decoding.batch_size, 1),
        ("--samples-per-shard", samples_per_shard, 1),
        ("--seed", decoding.seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RegenerateError(f"{name} must be an integer >= {low}, got {value!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise RegenerateError(f"--limit must be an integer >= 1, got {limit!r}")
    if not split or not split.replace("_", "").isalnum():
        raise RegenerateError(f"--split {split!r}: use letters, digits and '_' only (it names the shards)")
    from ..decoding.pipeline import DecodeInputError, check_sampling

    try:
        check_sampling(decoding.temperature, decoding.top_p, decoding.top_k)
    except DecodeInputError as e:
        raise RegenerateError(f"{e} (--temperature / --top-p / --top-k)") from None


def regenerate(
    shards,
    out: str,
    *,
    target: str,
    drafter: str | None = None,
    decoding: Decoding = Decoding(),
    split: str = "train",
    samples_per_shard: int = 1000,
    limit: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Regenerate the answers of ``shards`` into ``out`` (resuming a regeneration of the same job there); returns the
    manifest, plus this run's ``seconds`` and ``tokens_per_s`` (not written to the file)."""
    _check_args(decoding, samples_per_shard, limit, split)
    urls = check_shards(shards, "shards")
    target_dir = Path(target).expanduser().absolute()
    if not target_dir.is_dir():
        raise RegenerateError(f"--target {target_dir} is not a directory: give the target checkpoint directory")
    drafter_dir = Path(drafter).expanduser().absolute() if drafter else None
    if drafter_dir is not None and not (drafter_dir / "config.json").is_file():
        raise RegenerateError(f"--drafter {drafter_dir} holds no config.json: give a drafter train.py exported")
    check_replaceable(Path(out).expanduser().absolute(), KIND)  # a foreign --out is refused before any model loads
    inputs, manifests = describe_inputs(urls)
    gen = Regenerator(str(target_dir), str(drafter_dir) if drafter_dir else None, decoding, dtype=dtype, device=device)
    job = {
        "task": "regenerate",
        "regenerator_version": REGENERATOR_VERSION,
        "inputs": inputs,
        "source_manifests": manifests,
        "target": {"path": str(target_dir), "fingerprint": gen.adapter.fingerprint(), "dtype": dtype},
        "drafter": {"path": str(drafter_dir), "sha256": _dir_hash(drafter_dir)} if drafter_dir else None,
        "decoding": decoding.as_dict(gen.method),
        "split": split,
        "samples_per_shard": samples_per_shard,
        "limit": limit,
    }
    output = ShardOutput(out, job, split=split, samples_per_shard=samples_per_shard, notes=(RETOKENIZED,))
    done = output.open()
    if done is not None:
        log(f"{output.out} already holds this regeneration, complete ({done['counts']['written']} samples)")
        return done
    # Batches are fixed runs of --batch-size samples counted from the first, so a resumed run batches (and seeds)
    # every sample as the uninterrupted run did: it restarts at the batch holding the resume point and discards
    # what it regenerates before that point.
    resume = output.consumed
    first = resume - resume % decoding.batch_size
    if resume:
        log(f"resuming {output.out}: {len(output.shards)} shard(s) kept, from sample {resume}")
    per_input = [0] * len(urls)
    bar = Progress(None, resume, log, progress)
    t0 = time.perf_counter()
    regenerated = 0
    chunk: list[Sample] = []

    def flush() -> None:
        nonlocal regenerated
        if not chunk:
            return
        todo = [s for s in chunk if s.reject is None]
        gen.answer_batch(todo, chunk[0].ordinal)
        for s in chunk:
            if s.ordinal < resume:
                continue
            if s.reject is None:
                output.add_sample(s.ordinal, sample_key(s.ordinal), members_of(s, sample_key(s.ordinal)))
                if s.retokenized:
                    output.add_note(RETOKENIZED)
                regenerated += 1
            else:
                reason, detail = s.reject
                entry = {"id": s.id if s.record is not None else f"{s.shard}#{s.index}", "source": s.shard}
                output.add_reject(entry | {"record": s.index, "reason": reason, "detail": detail})
            bar.update(output.counts["written"], sum(output.counts.values()) - output.counts["written"])
        chunk.clear()

    ordinal = 0
    try:
        for number, name, index, raw in iter_samples(urls, gen.encoder):
            if limit is not None and ordinal >= limit:
                break
            per_input[number] += 1
            if ordinal >= first:
                sample = Sample(ordinal, name, index, raw or {})
                if raw is None:
                    sample.reject = ("corrupt_tar", f"{name} cannot be read past sample {index}")
                else:
                    gen.parse(sample)
                chunk.append(sample)
                if len(chunk) == decoding.batch_size:
                    flush()
            ordinal += 1
        flush()
        manifest = output.finish(ordinal, records_per_input=per_input)
    except BaseException:
        output.abort()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    counts = manifest["counts"]
    log(
        f"regenerated {counts['written']} of {counts['records']} samples into {len(manifest['shards'])} shard(s) in "
        f"{output.out} ({regenerated} this run in {seconds:.1f}s, {gen.generated_tokens / max(seconds, 1e-9):.1f} "
        f"generated tokens/s, {gen.method})"
    )
    skipped = counts["skipped"]
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1])) or "none"
    log(f"skipped {sum(skipped.values())}: {reasons}; manifest: {output.out / 'manifest.json'}")
    return {**manifest, "seconds": seconds, "tokens_per_s": gen.generated_tokens / max(seconds, 1e-9)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m specvlm_lit.data.regenerate",
        description="Re-answer every user turn of training shards with the frozen target and write new shards with "
        "provenance in the manifest (docs/data.md). Rerun the same command to resume.",
    )
    p.add_argument("shards", nargs="+", help="input shards: paths, brace patterns, globs or URLs webdataset opens")
    p.add_argument("--out", required=True, help="output directory: new, empty, or a regeneration of the same job")
    p.add_argument("--target", required=True, help="the frozen target's checkpoint directory")
    p.add_argument("--drafter", help="an exported drafter: decode with the lossless speculative decoder (batch 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="seeds sampling, per batch and turn")
    p.add_argument("--max-new-tokens", type=int, default=256, help="an answer must end (EOS) within this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call without --drafter")
    p.add_argument("--split", default="train", help="shard name prefix: <split>-000000.tar (default: train)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--limit", type=int, help="regenerate only the first N input samples")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    decoding = Decoding(a.temperature, a.top_p, a.top_k, a.seed, a.max_new_tokens, a.batch_size)
    run_cli(
        lambda: regenerate(
            a.shards,
            a.out,
            target=a.target,
            drafter=a.drafter,
            decoding=decoding,
            split=a.split,
            samples_per_shard=a.samples_per_shard,
            limit=a.limit,
            dtype=a.dtype,
            device=a.device,
            progress=not a.no_progress,
        ),
        a.out,
        what="regeneration",
        none_written="no sample could be regenerated",
    )


if __name__ == "__main__":
    main()
