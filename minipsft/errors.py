"""The errors a user meets: a row that cannot be trained on, a model that cannot be loaded. Each
message is one line (or a short listing) that names the row or the model and the fix."""
import os
from pathlib import Path

__all__ = ["DataError", "ModelLoadError", "local_problem", "load_problem"]


class DataError(ValueError):
    """A row that cannot be trained on: the message names the row (1-based) and why."""

    @classmethod
    def listing(cls, header: str, problems: list):
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        return cls(f"{header}:\n  " + "\n  ".join(problems[:10]) + more)


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message is one line naming the model and the fix."""


def local_problem(name: str) -> str | None:
    """Why ``name`` is not a loadable local model folder, or None when it is one or a hub id."""
    path = Path(name).expanduser()
    if path.is_file():
        return f"model {name!r} is a file, expected a folder written by save_pretrained"
    if path.is_dir():
        if not (path / "config.json").is_file():
            return (f"model folder {name!r} has no config.json: not a saved model (a training run "
                    "saves its model in OUT/final/)")
        return None
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:  # looks local
        return f"model folder {name!r} does not exist (check the path)"
    return None


def load_problem(name: str, error: Exception) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(name).expanduser().is_dir():
        return (f"model folder {name!r} could not be loaded (tokenizer or weights missing?): "
                f"{reason}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return (f"model {name!r} is neither a local folder nor in the hub cache, and offline mode "
                "is on (HF_HUB_OFFLINE=1): download it once with network, or pass a local folder")
    return (f"model {name!r} could not be loaded from the Hugging Face hub (no network, a "
            f"misspelt id, or a gated model): {reason}")
