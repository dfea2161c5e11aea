"""Fine-tuning data files: JSONL or Parquet in TRL's prompt-completion or conversational formats,
checked row by row. Every problem is reported with its row number (1-based: row N is line N of a
JSONL file) before any training starts; nothing is silently dropped."""
import json
from pathlib import Path

from .errors import DataError

__all__ = ["load_rows", "read_json_rows", "check_rows", "DataError"]


def load_rows(path) -> list:
    """Read a ``.jsonl``/``.json`` or ``.parquet`` (with ``datasets``) file into a list of dicts
    and check every row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    kind = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r} "
                        "(use .jsonl, .json or .parquet)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (expected one JSON object per row)")
    if kind == "parquet":
        import datasets

        try:
            rows = datasets.load_dataset("parquet", data_files=str(path), split="train").to_list()
        except Exception as e:  # noqa: BLE001 - any reader failure: name the file and the reason
            raise DataError(f"{path}: cannot be read as parquet: {type(e).__name__}: {e}") from e
    else:
        rows = read_json_rows(path)
    check_rows(rows, source=str(path))
    return rows


def read_json_rows(path: Path) -> list:
    """Rows of a JSONL file (or of a ``.json`` file holding one list of objects)."""
    text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not an error
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: not valid JSON: {e.msg}") from None
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: item {number} of the list: expected a JSON object, "
                                f"found {type(row).__name__}")
        return rows
    # split on newlines only: str.splitlines() would also split on U+2028 inside JSON strings
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():  # trailing blank lines are harmless
        lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataError(f"{path}: line {number} is blank (one JSON object per line, no gaps)")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {number}: not valid JSON: {e.msg} "
                            f"(column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object, found "
                            f"{type(row).__name__}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: the file holds no rows (only blank lines)")
    return rows


def _message_problem(messages, field):
    if not isinstance(messages, list):
        expected = "a list of messages" if field == "messages" else "a string or a list of messages"
        found = f"{type(messages).__name__} ({messages!r:.40})"
        return f"field '{field}' is {found}, expected {expected}"
    if not messages:
        return f"field '{field}' is an empty list of messages"
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
