"""``python -m specvlm_lit.data.convert``: public dataset files -> the webdataset shards this project trains on.

    python -m specvlm_lit.data.convert llava_v1_5_mix665k.json --image-root /data/llava --out data/llava665k

Inputs (``convert_inputs``): LLaVA-Instruct / ShareGPT4V JSON, OpenAI-style ``messages`` JSON / JSONL, Parquet and
Arrow tables with embedded images. Records are converted in a process pool, in order (``convert_samples``), and
written as shards of ``--samples-per-shard`` samples with a rejects file and a manifest (``convert_output``); an
interrupted conversion resumes when rerun with the same arguments. argparse, not Hydra: this is a scripting tool
with file arguments and no config tree to compose. docs/data.md has the formats, the guarantees and the limits.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import UserError, one_line
from .convert_inputs import FORMATS, Source, iter_records, open_source
from .convert_output import ShardOutput, run_cli
from .convert_samples import (
    IMAGE_FORMATS,
    Converted,
    ConvertOptions,
    Rejected,
    Task,
    convert_record,
    default_workers,
    init_worker,
)

#: Records handed to a worker at a time (pool overhead vs. lumpy progress).
CHUNK = 16
#: Without a terminal, a progress line every this many records.
LOG_EVERY = 10_000


def _tasks(sources: list[Source], start: int, per_input: list[int]) -> Iterator[Task]:
    """Every record of every input in order, numbered over all of them; the first ``start`` (already converted) are
    read and counted but not handed on. ``per_input`` receives each input's record count."""
    ordinal = 0
    for i, source in enumerate(sources):
        for index, record in enumerate(iter_records(source)):
            per_input[i] += 1
            if ordinal >= start:
                yield Task(ordinal, source.path.name, index, source.schema, record)
            ordinal += 1


class _Window:
    """The tasks, at most ``limit`` of them handed out and not yet :meth:`release`-d: ``Pool.imap`` reads its input
    eagerly in a thread, which would load every record (and every embedded image) into memory ahead of the workers.
    :meth:`stop` lets that thread finish (a pool being terminated joins it)."""

    def __init__(self, items: Iterator[Task], limit: int):
        self._items, self._slots, self._stopped = items, threading.Semaphore(limit), False

    def __iter__(self):
        for item in self._items:
            self._slots.acquire()
            if self._stopped:
                return
            yield item

    def release(self) -> None:
        self._slots.release()

    def stop(self) -> None:
        self._stopped = True
        self._slots.release()


def _results(tasks: Iterator[Task], options: ConvertOptions, workers: int) -> Iterator[Converted | Rejected]:
    if workers == 1:  # in-process: no pickling, and one process to debug
        init_worker(options, in_pool=False)
        yield from map(convert_record, tasks)
        return
    window = _Window(tasks, limit=workers * CHUNK * 4)  # > CHUNK: a partial chunk cannot hold the window shut
    with multiprocessing.Pool(workers, initializer=init_worker, initargs=(options,)) as pool:
        try:
            for result in pool.imap(convert_record, iter(window), chunksize=CHUNK):
                window.release()
                yield result
        finally:
            window.stop()


class Progress:
    """tqdm on a terminal, else a line every :data:`LOG_EVERY` records (logs stay readable)."""

    def __init__(self, total: int | None, initial: int, log: Callable[[str], None], enabled: bool):
        self.log, self.n, self.bar = log, initial, None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="rec", dynamic_ncols=True, smoothing=0.05)

    def update(self, written: int, skipped: int) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            if self.n % 64 == 0:
                self.bar.set_postfix(written=written, skipped=skipped, refresh=False)
        elif self.enabled and self.n % LOG_EVERY == 0:
            self.log(f"  {self.n} records: {written} written, {skipped} skipped")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_args(samples_per_shard: int, workers: int, max_length: int, split: str, image_format: str) -> None:
    if samples_per_shard < 1:
        raise UserError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if max_length < 1:
        raise UserError(f"--max-length must be >= 1, got {max_length}")
    if not split or not split.replace("_", "").isalnum():
        raise UserError(f"--split {split!r}: use letters, digits and '_' only (it names the shards)")
    if image_format not in IMAGE_FORMATS:
        raise UserError(f"--image-format {image_format!r} is not one of {', '.join(IMAGE_FORMATS)}")


def _check_target(target: Path) -> None:
    """Load the target's prompt builder once here: a bad --target is one error now, not one per worker."""
    from ..targets import load_prompt_builder

    try:
        load_prompt_builder(target)
    except UserError:
        raise
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for what is not a processor dir
        raise UserError(
            f"--target {target}: cannot load its tokenizer and processor ({one_line(e)}); give a target directory"
        ) from None


def convert(
    inputs: list[str],
    out: str,
    *,
    image_root: str | None = None,
    input_format: str | None = None,
    split: str = "train",
    samples_per_shard: int = 1000,
    workers: int | None = None,
    target: str | None = None,
    max_length: int = 2048,
    image_format: str = "source",
    drop_system: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Convert ``inputs`` into shards in ``out`` (resuming a conversion of the same job there); returns the manifest.

    ``workers`` defaults to every core. The returned manifest also carries ``"seconds"`` and ``"samples_per_s"`` of
    this run (they are not written to the file, which must not depend on the run)."""
    workers = default_workers() if workers is None else workers
    _check_args(samples_per_shard, workers, max_length, split, image_format)
    if not inputs:
        raise UserError("give at least one input file")
    sources = [open_source(p, input_format) for p in inputs]
    root = Path(image_root).expanduser().absolute() if image_root else sources[0].path.parent
    if image_root and not root.is_dir():
        raise UserError(f"--image-root {root} is not a directory")
    target_path = Path(target).expanduser().absolute() if target else None
    if target_path is not None:
        _check_target(target_path)
    job = {
        "inputs": [s.describe() for s in sources],
        "image_root": str(root),
        "split": split,
        "samples_per_shard": samples_per_shard,
        "image_format": image_format,
        "drop_system": drop_system,
        "target": str(target_path) if target_path else None,
        "max_length": max_length if target_path else None,
    }
    output = ShardOutput(out, job, split=split, samples_per_shard=samples_per_shard)
    done = output.open()
    if done is not None:
        log(
            f"{output.out} already holds this conversion, complete ({done['counts']['written']} samples); nothing to do"
        )
        return done
    if output.consumed:
        log(f"resuming {output.out}: {len(output.shards)} shard(s) kept, from record {output.consumed}")
    options = ConvertOptions(str(root), image_format, drop_system, job["target"], max_length)
    per_input = [0] * len(sources)
    total = sum(s.rows for s in sources) if all(s.rows is not None for s in sources) else None
    bar = Progress(total, output.consumed, log, progress)
    t0 = time.perf_counter()
    converted = 0
    results = _results(_tasks(sources, output.consumed, per_input), options, workers)
    try:
        for result in results:
            if isinstance(result, Converted):
                output.add_sample(result.ordinal, result.key, result.members)
                converted += 1
            else:
                output.add_reject(result.entry())
            bar.update(output.counts["written"], sum(output.counts.values()) - output.counts["written"])
        manifest = output.finish(sum(per_input), records_per_input=per_input)
    except BaseException:
        results.close()  # stop the pool first: its workers hold copies of the output's lock
        output.abort()
        raise
    finally:
        results.close()  # stops the pool now, not when the generator is collected
        bar.close()
    seconds = time.perf_counter() - t0
    report(manifest, output.out, seconds, converted, log)
    return {**manifest, "seconds": seconds, "samples_per_s": converted / seconds if seconds else 0.0}


def report(manifest: dict, out: Path, seconds: float, converted_now: int, log: Callable[[str], None]) -> None:
    counts = manifest["counts"]
    log(
        f"converted {counts['written']} of {counts['records']} records into {len(manifest['shards'])} shard(s) in "
        f"{out} ({converted_now} this run in {seconds:.1f}s, {converted_now / max(seconds, 1e-9):.1f} samples/s)"
    )
    skipped = counts["skipped"]
    if skipped:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1]))
        log(f"skipped {sum(skipped.values())}: {reasons}; ids and details in {out / manifest['rejects']['file']}")
    else:
        log("skipped 0")
    log(f"manifest: {out / 'manifest.json'}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m specvlm_lit.data.convert",
        description="Convert LLaVA-Instruct/ShareGPT4V JSON, OpenAI-style messages JSON/JSONL, or Parquet/Arrow "
        "tables into webdataset shards for training (docs/data.md). Rerun the same command to resume.",
    )
    p.add_argument("inputs", nargs="+", help="input files, converted in this order into one set of shards")
    p.add_argument("--out", required=True, help="output directory: new, empty, or a conversion of the same job")
    p.add_argument("--image-root", help="directory relative image paths start from (default: the first input's)")
    p.add_argument("--format", choices=FORMATS, help="force the input format instead of detecting it")
    p.add_argument("--split", default="train", help="shard name prefix: <split>-000000.tar (default: train)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=default_workers(), help="processes (default: every core)")
    p.add_argument("--target", help="target directory: encode each sample with its processor, reject what it skips")
    p.add_argument("--max-length", type=int, default=2048, help="with --target: reject samples longer than this")
    p.add_argument(
        "--image-format",
        choices=IMAGE_FORMATS,
        default="source",
        help="source: keep PNG/JPEG/WebP bytes, re-encode others as PNG; png/jpg: re-encode every image",
    )
    p.add_argument("--drop-system", action="store_true", help="drop system messages instead of rejecting the sample")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    run_cli(
        lambda: convert(
            a.inputs,
            a.out,
            image_root=a.image_root,
            input_format=a.format,
            split=a.split,
            samples_per_shard=a.samples_per_shard,
            workers=a.workers,
            target=a.target,
            max_length=a.max_length,
            image_format=a.image_format,
            drop_system=a.drop_system,
            progress=not a.no_progress,
        ),
        a.out,
        what="conversion",
        none_written="no record could be converted",
    )


if __name__ == "__main__":
    main()
