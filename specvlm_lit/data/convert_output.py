"""The converter's output directory: deterministic shards, a rejects file, a manifest, and resume after a crash.

Layout of ``--out``::

    .specvlm-lit          marker: this directory holds converted shards (other directories are refused)
    <split>-000000.tar    one sample = <key>.json + its images (<key>.<png|jpg|webp>, or <key>.0.<ext>, <key>.1.<ext>,
                          ... for several, none for text only), --samples-per-shard samples a shard
    rejects.jsonl         one line per record not converted: {"id", "source", "record", "reason", "detail"}
    progress.json         while converting: the job, the shards completed and their sha256
    manifest.json         written last, when the conversion is complete (progress.json is then removed)

Every shard is written to a hidden temporary file next to it and renamed into place when complete; then
``progress.json`` is replaced (write + rename) with the shard's sha256, the number of records consumed and the
length of ``rejects.jsonl`` at that point. A conversion interrupted anywhere is resumed by rerunning it with the
same arguments: completed shards whose sha256 still matches are kept, everything after them is rewritten, so there
are no gaps or duplicates. Tar members carry fixed metadata (mtime 0, uid/gid 0, mode 0644, no user names), so
the shards, ``rejects.jsonl`` and ``manifest.json`` are byte-identical to those of an uninterrupted run.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError, one_line
from ..utils.atomic import MARKER, atomic_file, check_replaceable, fsync_path, marker_text
from .convert_inputs import sha256_file

KIND = "converted-shards"
MANIFEST, PROGRESS, REJECTS = "manifest.json", "progress.json", "rejects.jsonl"
#: Bump when the shard contents change for the same inputs: an old progress file then no longer matches.
CONVERTER_VERSION = 2  # 2: text-only and multi-image samples are converted (1 rejected them)


class ConversionMismatch(UserError):
    """``--out`` holds a conversion of other inputs or other arguments."""


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_json_atomic(path: Path, obj: dict) -> None:
    with atomic_file(path) as f:
        f.write((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); remove its directory and convert again") from None


def _describe_difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys) or "nothing"


class ShardOutput:
    """Writes one conversion into ``out``. ``job`` is everything that decides the output (inputs with their sha256,
    the output-shaping arguments): a rerun resumes only a conversion of the same ``job``."""

    def __init__(
        self, out: str | os.PathLike, job: dict, *, split: str, samples_per_shard: int, notes: tuple[str, ...] = ()
    ):
        self.out = Path(out).expanduser().absolute()
        self.notes = notes  # count keys of written samples worth knowing about (not skips): manifest counts.notes
        self.job = {"converter_version": CONVERTER_VERSION, **job}
        self.split, self.samples_per_shard = split, samples_per_shard
        self.shards: list[dict] = []  # completed: {"name", "samples", "sha256"}
        self.counts: Counter = Counter()  # "written" and every reject reason
        self.consumed = 0  # records (over all inputs) that completed shards and rejects account for
        self.rejects_bytes = 0  # length of rejects.jsonl at the end of the last completed shard
        self._progress: list[dict] = []  # progress.json's entries, one per completed shard
        self._lock_file = None  # the marker, open and locked while converting
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._in_shard = 0
        self._rejects = None

    # ------------------------------------------------------------------------------------------------ start
    def open(self) -> dict | None:
        """Prepare ``out``: new, empty, or a conversion of the same job (resumed). Returns the manifest when that
        conversion is already complete (nothing to do), else ``None``. A foreign directory raises and is left as
        it was."""
        check_replaceable(self.out, KIND)  # new, empty, or carrying a converted-shards marker; else refused
        self.out.mkdir(parents=True, exist_ok=True)
        manifest_path, progress_path = self.out / MANIFEST, self.out / PROGRESS
        if manifest_path.is_file():
            manifest = _read_json(manifest_path)
            self._check_job(manifest.get("job", {}), MANIFEST)
            bad = [s["name"] for s in manifest["shards"] if sha256_file(self.out / s["name"]) != s["sha256"]]
            if bad:
                raise UserError(
                    f"{self.out} holds a complete conversion but {', '.join(bad)} no longer match the sha256 in its "
                    f"{MANIFEST}; remove the directory and convert again"
                )
            return manifest
        if not (self.out / MARKER).is_file():
            with atomic_file(self.out / MARKER) as f:
                f.write(marker_text(KIND).encode("utf-8"))
        self._lock()
        try:
            if progress_path.is_file():
                progress = _read_json(progress_path)
                self._check_job(progress.get("job", {}), PROGRESS)
                self._resume(progress)
            self._clean_leftovers()
            self._rejects = open(self.out / REJECTS, "ab")
            self._rejects.truncate(self.rejects_bytes)
        except BaseException:
            self._unlock()
            raise
        return None

    def _lock(self) -> None:
        """Hold an exclusive lock on the marker while converting: a second converter on the same ``--out`` would
        interleave its shards with this one's."""
        self._lock_file = open(self.out / MARKER, "rb")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise UserError(f"another conversion is writing to {self.out}; wait for it to end") from None

    def _check_job(self, old: dict, where: str) -> None:
        if old != self.job:
            raise ConversionMismatch(
                f"{self.out} holds a conversion of other inputs or arguments ({where} differs in: "
                f"{_describe_difference(old, self.job)}); rerun with the arguments it was started with to resume it, "
                f"or choose a new --out"
            )

    def _resume(self, progress: dict) -> None:
        """Keep the completed shards whose bytes still match; stop at the first that does not."""
        kept = 0
        for entry in progress["shards"]:
            path = self.out / entry["shard"]["name"]
            if not path.is_file() or sha256_file(path) != entry["shard"]["sha256"]:
                break
            kept += 1
        # With none kept, everything restarts from zero (rejects before the first shard included).
        self._progress = progress["shards"][:kept]
        if kept:
            last = self._progress[-1]
            self.shards = [e["shard"] for e in self._progress]
            self.counts, self.consumed, self.rejects_bytes = (
                Counter(last["counts"]),
                last["consumed"],
                last["rejects_bytes"],
            )

    def _clean_leftovers(self) -> None:
        """Remove what an interrupted run left after its last completed shard: temporary files and shards that
        were renamed into place but never recorded (they are rewritten identically)."""
        keep = {s["name"] for s in self.shards}
        for p in self.out.iterdir():
            ours_tmp = p.name.startswith(".") and ".tmp-" in p.name
            stale_shard = p.name.startswith(f"{self.split}-") and p.name.endswith(".tar") and p.name not in keep
            if p.is_file() and (ours_tmp or stale_shard):
                p.unlink()

    # ------------------------------------------------------------------------------------------------ writing
    def _shard_path(self, number: int) -> Path:
        return self.out / f"{self.split}-{number:06d}.tar"

    def add_sample(self, ordinal: int, key: str, members) -> None:
        if self._tar is None:
            self._tmp = _tmp_name(self._shard_path(len(self.shards)))
            # USTAR: plain headers only, no pax records carrying times or user names.
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        for ext, data in members:
            self._tar.addfile(_tar_info(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self._in_shard += 1
        self.counts["written"] += 1
        if self._in_shard == self.samples_per_shard:
            self.close_shard(consumed=ordinal + 1)

    def add_note(self, name: str) -> None:
        """Count a written sample under ``name`` (one of ``notes``); kept across resume like every count."""
        assert name in self.notes, name
        self.counts[name] += 1

    def add_reject(self, entry: dict) -> None:
        self._rejects.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
        self.counts[entry["reason"]] += 1

    def close_shard(self, consumed: int) -> None:
        """Publish the shard being written (rename), then record it, with where the inputs stand, in the progress
        file. A crash before the progress write leaves a shard the next run removes and rewrites."""
        self._tar.close()
        fsync_path(self._tmp)
        path = self._shard_path(len(self.shards))
        os.replace(self._tmp, path)
        self.shards.append({"name": path.name, "samples": self._in_shard, "sha256": sha256_file(path)})
        self._tar, self._tmp, self._in_shard = None, None, 0
        self._rejects.flush()
        os.fsync(self._rejects.fileno())
        self.consumed, self.rejects_bytes = consumed, self._rejects.tell()
        # One entry per shard, each with the state at its end, so a resume can stop at any shard that went bad.
        self._progress.append(
            {
                "shard": self.shards[-1],
                "consumed": consumed,
                "counts": dict(self.counts),
                "rejects_bytes": self.rejects_bytes,
            }
        )
        write_json_atomic(self.out / PROGRESS, {"job": self.job, "shards": self._progress})

    def finish(self, consumed: int, *, records_per_input: list[int]) -> dict:
        """Close the last (partial) shard, write the manifest, drop the progress file; returns the manifest."""
        if self._tar is not None:
            self.close_shard(consumed)
        self._rejects.flush()
        os.fsync(self._rejects.fileno())
        self._rejects.close()
        skipped = {k: v for k, v in sorted(self.counts.items()) if k != "written" and k not in self.notes and v}
        counts = {
            "records": sum(records_per_input),
            "records_per_input": records_per_input,
            "written": self.counts["written"],
            "skipped": skipped,
        }
        if self.notes:
            counts["notes"] = {k: self.counts[k] for k in self.notes}
        manifest = {
            "job": self.job,
            "counts": counts,
            "shards": self.shards,
            "rejects": {"file": REJECTS, "lines": sum(skipped.values()), "sha256": sha256_file(self.out / REJECTS)},
        }
        write_json_atomic(self.out / MANIFEST, manifest)
        (self.out / PROGRESS).unlink(missing_ok=True)
        fsync_path(self.out)
        self._unlock()
        return manifest

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the lock
            self._lock_file = None

    def abort(self) -> None:
        """After an error: drop the unfinished shard's temporary file (the completed ones stay for a resume)."""
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None
        if self._rejects is not None and not self._rejects.closed:
            self._rejects.close()
        self._unlock()


def run_cli(job: Callable[[], dict], out: str | Path, *, what: str, none_written: str) -> dict:
    """Run a shard-writing ``job`` for a command line: the converter's and the regenerator's shared epilogue.

    A UserError becomes a one-line ``error:`` exit; Ctrl-C exits 130 saying that rerunning resumes the ``what``
    (e.g. "conversion") in ``out``; a job that wrote nothing fails with ``none_written`` and where the reasons are.
    Returns the job's manifest.
    """
    try:
        manifest = job()
    except UserError as e:
        raise SystemExit(f"error: {one_line(e)}") from None
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to resume the {what} in {out}", file=sys.stderr)
        raise SystemExit(130) from None
    if manifest["counts"]["written"] == 0:
        raise SystemExit(f"error: {none_written}; the reasons are in {Path(out) / REJECTS}")
    return manifest
