"""Fine-tuning data files: JSONL or Parquet in TRL's formats, read with `datasets`, checked row by row.

Formats: prompt-completion (``prompt``, ``completion``: strings, or lists of chat messages) and
conversational (``messages``: a list of ``{"role", "content"}`` ending with the assistant's turn).
Every problem is reported with its row number (1-based: row N is line N of a JSONL file) before
any training starts; nothing is silently dropped.
"""
from pathlib import Path

from .model import DataError

__all__ = ["load_rows", "check_rows", "DataError"]


def load_rows(path) -> list:
    """Read a ``.jsonl``/``.json`` or ``.parquet`` file into a list of dicts and check every row."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r} (use .jsonl, .json or .parquet)")
    try:
        rows = datasets.load_dataset(kind, data_files=str(path), split="train").to_list()
    except Exception as e:  # arrow type clashes, broken JSON, ...: say which file
        raise DataError(f"{path}: cannot be read as {kind}: {e}") from e
    check_rows(rows, source=str(path))
    return rows


def _message_problem(messages, field):
    if not isinstance(messages, list) or not messages:
        return f"field '{field}' is empty or not a list of messages"
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not m.get("role") or not isinstance(m.get("content"), str) \
                or not m["content"].strip():
            return f"field '{field}': message {k} needs a non-empty 'role' and 'content'"
    return None


def _row_problem(row) -> str | None:
    if row.get("messages") is not None:
        problem = _message_problem(row["messages"], "messages")
        if problem is None and row["messages"][-1]["role"] != "assistant":
            problem = "field 'messages' must end with an assistant message (the completion)"
        if problem is None and len(row["messages"]) < 2:
            problem = "field 'messages' has no prompt before the assistant message"
        return problem
    for field in ("prompt", "completion"):
        value = row.get(field)
        if value is None:
            return f"field '{field}' is missing (expected 'prompt' and 'completion', or 'messages')"
        if isinstance(value, str):
            if not value.strip():
                return f"field '{field}' is empty"
        elif (problem := _message_problem(value, field)) is not None:
            return problem
    if isinstance(row["prompt"], str) != isinstance(row["completion"], str):
        return "'prompt' and 'completion' must both be strings or both be message lists"
    return None


def check_rows(rows, source: str = "data") -> None:
    """Raise one ``DataError`` naming every row (up to 10 shown) with a missing or empty field."""
    if not rows:
        raise DataError(f"{source}: no rows")
    problems = [f"row {i}: {p}" for i, row in enumerate(rows, start=1) if (p := _row_problem(row))]
    if problems:
        raise DataError.listing(f"{source}: {len(problems)} bad row(s)", problems)
