"""Prompt datasets from ``.jsonl`` or ``.parquet`` files.

Each record yields a :class:`PromptRecord`: the prompt (a string, or a list of chat
messages ``[{"role": ..., "content": ...}]`` kept as is) and an optional label (the
ground truth a rule-based reward compares against). Keys may be nested with dots,
verl style: ``label_key="reward_model.ground_truth"`` reads
``{"reward_model": {"ground_truth": "95"}}``; a literal top-level key containing a
dot wins over the nested reading.

Every problem is a :class:`DataError` (a ``ValueError``) with a one-line message
that starts with the path: missing file, unknown extension, unreadable or corrupt
line (with its number), missing key (with its name), empty dataset.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DataError", "PromptRecord", "Prompt", "load_prompts", "format_prompt", "SUFFIXES"]

Prompt = str | list[dict[str, str]]  # text, or chat messages [{"role", "content"}]
SUFFIXES = (".jsonl", ".parquet")
_MISSING = object()


class DataError(ValueError):
    """A dataset that cannot be used; the message is one line naming path and problem."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: text or chat messages, plus an optional label (ground truth)."""

    prompt: Prompt
    label: str | None = None
    data_source: str | None = None
    """Where the record comes from (verl's ``data_source``): validation scores are also
    reported per source (``val/<data_source>/score/mean``)."""


def _get(record: dict, key: str) -> Any:
    """``record[key]``, or the nested lookup ``record[a][b]...`` for ``key = "a.b..."``."""
    if key in record:
        return record[key]
    node: Any = record
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _prompt_value(value: Any, where: str, key: str) -> Prompt:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: prompt {key!r} is empty")
        return value
    if isinstance(value, (list, tuple)) and value:
        messages = []
        for i, msg in enumerate(value):
            if not (
                isinstance(msg, dict)
                and isinstance(msg.get("role"), str)
                and isinstance(msg.get("content"), str)
            ):
                raise DataError(
                    f"{where}: prompt {key!r} message {i} is not a "
                    "{'role': str, 'content': str} dict"
                )
            messages.append({"role": msg["role"], "content": msg["content"]})
        return messages
    raise DataError(
        f"{where}: prompt {key!r} must be a non-empty string or list of chat messages, "
        f"got {type(value).__name__}"
    )


def _label_value(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    return json.dumps(value, sort_keys=True)  # lists/dicts: a stable string form


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where}: line is not valid UTF-8 ({e.reason} at byte {e.start})"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def _column(key: str, names: list[str]) -> str:
    """Top-level parquet column holding ``key`` (nested keys live in struct columns)."""
    return key if key in names else key.split(".")[0]


def _iter_parquet(path: Path, prompt_key: str, label_key: str | None,
                  source_key: str | None = None) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a core dependency
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        names = pq.read_schema(path).names
        if _column(prompt_key, names) not in names:
            raise DataError(
                f"{path}: missing prompt key {prompt_key!r} (columns: {', '.join(names)})"
            )
        # Read only the columns the keys live in (datasets often carry big extra columns).
        columns = {_column(prompt_key, names)}
        for key in (label_key, source_key):
            if key and _column(key, names) in names:
                columns.add(_column(key, names))
        table = pq.read_table(path, columns=sorted(columns))
    except DataError:
        raise
    except Exception as e:  # ArrowInvalid, OSError, ...: one line, no traceback
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: not a readable parquet file ({msg})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}: row {i}", row


def load_prompts(
    path: str | Path, prompt_key: str = "prompt", label_key: str | None = "label",
    source_key: str | None = "data_source",
) -> list[PromptRecord]:
    """Load prompts (and labels) from a ``.jsonl`` or ``.parquet`` file.

    Args:
        path: dataset file.
        prompt_key: key of the prompt, dots for nesting. Required in every record.
        label_key: key of the label, dots for nesting, or ``None`` for no labels.
            Labels are optional: a dataset where no record has the key gets
            ``label=None`` throughout; a dataset where only some records have it is
            an error. Non-string labels are turned into strings (``95`` -> ``"95"``).
        source_key: key of the record's data source (verl's ``data_source``), or
            ``None``. Optional per record (``data_source=None`` where absent).

    Raises:
        DataError: one line naming the path (and line/row, key) and the problem.
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DataError(
            f"{path}: unknown dataset extension {path.suffix!r}, "
            f"expected one of {', '.join(SUFFIXES)}"
        )
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")

    try:
        rows = (
            _iter_jsonl(path)
            if path.suffix == ".jsonl"
            else _iter_parquet(path, prompt_key, label_key, source_key)
        )
        records: list[tuple[str, Any, Any]] = []
        sources: list[str | None] = []
        for where, row in rows:
            prompt = _get(row, prompt_key)
            if prompt is _MISSING or prompt is None:  # parquet stores absent struct fields as null
                null = " (null)" if prompt is None else ""
                raise DataError(f"{where}: missing prompt key {prompt_key!r}{null}")
            label = _get(row, label_key) if label_key else None
            records.append((where, _prompt_value(prompt, where, prompt_key), label))
            source = _get(row, source_key) if source_key else _MISSING
            sources.append(None if source is _MISSING or source is None else str(source))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not records:
        raise DataError(f"{path}: empty dataset (no records)")

    has_label = [label is not _MISSING for _, _, label in records]
    if any(has_label) and not all(has_label):
        where = records[has_label.index(False)][0]
        raise DataError(f"{where}: missing label key {label_key!r} (other records have it)")
    return [
        PromptRecord(prompt, None if label is _MISSING else _label_value(label), source)
        for (_, prompt, label), source in zip(records, sources)
    ]


def format_prompt(prompt: Prompt, tokenizer: Any = None, chat_template: bool = False) -> str:
    """The text to tokenize for a prompt.

    Chat messages always go through ``tokenizer.apply_chat_template`` (with the
    generation prompt appended); a plain string does when ``chat_template`` is set
    (as a single user message), and is returned unchanged otherwise.
    """
    if isinstance(prompt, str) and not chat_template:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "prompt needs a chat template but the tokenizer has none "
            "(chat messages or chat_template=True)"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
