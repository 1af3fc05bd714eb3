"""The converter's input files: which public format each one is, its hash, and its records in file order.

Formats (``--format`` names; detected from the extension and the first record unless forced):

* ``llava``: LLaVA-Instruct / ShareGPT4V records (``id``, ``image``, ``conversations`` of ``from``/``value``) in a
  JSON array or JSON Lines;
* ``messages``: OpenAI-style records (``messages`` of ``role``/``content``) in a JSON array or JSON Lines;
* ``parquet`` / ``arrow``: tables (a Hugging Face hub export, ``Dataset.to_parquet``, ``save_to_disk``'s
  ``.arrow`` files) read offline with the ``datasets`` library, images as embedded bytes; each row is a
  ``conversations`` (LLaVA) or ``messages`` record, which one is read from the columns.

A JSON array is parsed one record at a time, so a 1 GB LLaVA-665K file does not have to fit in memory as Python
objects. A JSON Lines line that is not JSON becomes a :class:`Malformed` record (rejected as ``bad_json``, the
conversion goes on); a JSON array cannot be read past a syntax error, so that stops the conversion with a
:class:`InputFormatError` naming the place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

FORMATS = ("llava", "messages", "parquet", "arrow")
TABLE_EXTENSIONS = {".parquet": "parquet", ".arrow": "arrow"}
JSON_EXTENSIONS = (".json", ".jsonl", ".ndjson")
#: Record schemas, named by the field that holds the conversation.
SCHEMA_FIELDS = {"llava": "conversations", "messages": "messages"}
_CHUNK = 1 << 20
_WS = re.compile(r"\s*")


class InputFormatError(UserError):
    """An input file that is missing, of no supported format, or unreadable as the format it claims."""


@dataclass(frozen=True)
class Malformed:
    """A record that is not valid JSON (a JSON Lines line); ``detail`` says why."""

    detail: str


@dataclass(frozen=True)
class Source:
    """One input file: ``container`` is how records are stored, ``schema`` how a record holds its conversation."""

    path: Path
    format: str  # one of FORMATS
    container: str  # json-array | jsonl | parquet | arrow
    schema: str  # llava | messages
    sha256: str
    rows: int | None = None  # known up front for tables only (progress bar total)

    def describe(self) -> dict:
        return {"path": str(self.path), "format": self.format, "schema": self.schema, "sha256": self.sha256}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- JSON
def _json_container(path: Path) -> str:
    """``json-array`` when the first non-blank character is ``[``, else ``jsonl`` (one object a line)."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return "json-array" if stripped[0] == "[" else "jsonl"
    raise InputFormatError(f"{path} is empty: give a JSON array or JSON Lines file of records")


def iter_json_array(path: Path) -> Iterator[object]:
    """The elements of the JSON array in ``path``, one at a time (the file is read in 1 MB chunks)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f:
        buf, pos, eof = "", 0, False

        def more(min_size: int = _CHUNK) -> None:
            nonlocal buf, pos, eof
            # Read at least as much as is buffered: a record larger than a chunk costs O(size), not O(size^2).
            data = f.read(max(min_size, len(buf) - pos))
            eof = not data
            buf, pos = buf[pos:] + data, 0

        def skip_ws() -> None:
            nonlocal pos
            while True:
                pos = _WS.match(buf, pos).end()
                if pos < len(buf) or eof:
                    return
                more()

        def fail(what: str) -> InputFormatError:
            return InputFormatError(f"{path} is not a valid JSON array of records: {what}. Fix the file and rerun")

        more()
        skip_ws()
        if buf[pos : pos + 1] != "[":
            raise fail("it does not start with '['")
        pos += 1
        skip_ws()
        if buf[pos : pos + 1] == "]":
            return
        index = 0
        while True:
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    # A value that ends at the end of the buffer may be cut (a number, say): read on to be sure.
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError as e:
                    if eof:
                        raise fail(f"record {index}: {e.msg}") from None
                more()
            yield value
            index += 1
            pos = end
            skip_ws()
            sep = buf[pos : pos + 1]
            pos += 1
            if sep == "]":
                return
            if sep != ",":
                raise fail(f"expected ',' or ']' after record {index - 1}, found {sep or 'the end of the file'!r}")
            skip_ws()


def iter_json_lines(path: Path) -> Iterator[object]:
    """One record per non-blank line; a line that is not JSON is a :class:`Malformed` record, not an error."""
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError as e:  # includes bad UTF-8
                yield Malformed(f"line {line_no} is not JSON: {e}")


# ---------------------------------------------------------------------------------------------------- tables
def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach for the hub
    try:
        import datasets
    except ImportError:  # pragma: no cover - it is a declared dependency
        raise InputFormatError("reading Parquet/Arrow needs the `datasets` library: pip install datasets") from None
    datasets.disable_progress_bars()
    return datasets


def _open_table(path: Path, container: str):
    """A streaming ``datasets.IterableDataset`` over the file with images left as ``{"bytes", "path"}`` (the
    workers decode them: decoding here would serialise the conversion on one core)."""
    datasets = _datasets()
    try:
        if container == "parquet":
            ds = datasets.IterableDataset.from_parquet(str(path))
        else:
            ds = datasets.IterableDataset.from_file(str(path))
    except Exception as e:  # pyarrow raises several types for files that are not what their name says
        raise InputFormatError(f"{path} cannot be read as {container}: {e}") from None
    return ds.decode(False)


def _table_facts(path: Path, container: str) -> tuple[list[str], int]:
    """Column names and row count, read from the file's metadata (no row is read)."""
    datasets = _datasets()
    try:
        if container == "parquet":
            import pyarrow.parquet as pq  # installed with datasets

            meta = pq.ParquetFile(path)
            return list(meta.schema_arrow.names), meta.metadata.num_rows
        table = datasets.Dataset.from_file(str(path))  # memory-mapped, nothing copied
        return list(table.column_names), table.num_rows
    except Exception as e:  # pyarrow raises several types for files that are not what their name says
        raise InputFormatError(f"{path} cannot be read as {container}: {e}") from None


def iter_table(path: Path, container: str) -> Iterator[dict]:
    try:
        yield from _open_table(path, container)
    except InputFormatError:
        raise
    except Exception as e:  # a file cut short or corrupt part-way: pyarrow's errors have no common base
        raise InputFormatError(f"{path} cannot be read to its end as {container}: {e}") from None


# ---------------------------------------------------------------------------------------------------- detection
def _schema_of(keys, path: Path, where: str) -> str:
    for schema, field in SCHEMA_FIELDS.items():
        if field in keys:
            return schema
    raise InputFormatError(
        f"{path}: cannot tell the format from {where} (fields: {', '.join(map(str, keys)) or 'none'}): expected a "
        f"'conversations' (LLaVA) or 'messages' (OpenAI style) field; fix the file or pass --format"
    )


def open_source(path: str | os.PathLike, forced: str | None = None) -> Source:
    """Detect ``path``'s format (``forced`` overrides it) and hash the file; nothing but the first record is read."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        hint = " (a save_to_disk directory: pass its .arrow files)" if path.is_dir() else ""
        raise InputFormatError(f"input {path} is not a file{hint}")
    if forced is not None and forced not in FORMATS:
        raise InputFormatError(f"--format {forced!r} is not one of {', '.join(FORMATS)}")
    ext = path.suffix.lower()
    container = (
        TABLE_EXTENSIONS.get(ext) if forced is None else (forced if forced in TABLE_EXTENSIONS.values() else None)
    )
    rows = None
    if container is not None:
        columns, rows = _table_facts(path, container)
        schema = _schema_of(columns, path, "its columns")
        fmt = container
    else:
        if forced is None and ext not in JSON_EXTENSIONS:
            raise InputFormatError(
                f"{path}: unknown extension {ext!r}; give .json/.jsonl (LLaVA or messages records), .parquet or "
                f".arrow, or pass --format {{{','.join(FORMATS)}}}"
            )
        container = _json_container(path)
        if forced is not None:
            schema = forced
        else:
            records = iter_json_array(path) if container == "json-array" else iter_json_lines(path)
            first = next((r for r in records if not isinstance(r, Malformed)), None)
            if not isinstance(first, dict):
                raise InputFormatError(
                    f"{path}: the first record is {'missing' if first is None else type(first).__name__}, not a JSON "
                    f"object; fix the file or pass --format"
                )
            schema = _schema_of(list(first), path, "its first record")
        fmt = schema
    return Source(path, fmt, container, schema, sha256_file(path), rows)


def iter_records(source: Source) -> Iterator[object]:
    """``source``'s records in file order: dicts, or anything else the file holds (rejected later, not here)."""
    if source.container == "json-array":
        return iter_json_array(source.path)
    if source.container == "jsonl":
        return iter_json_lines(source.path)
    return iter_table(source.path, source.container)
