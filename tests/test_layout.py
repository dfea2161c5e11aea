"""The package's shape (issue 23): three floors, each importing only from below; no function over
60 lines, no module over 400, no line over 100 characters; the core within 700 lines."""
import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "minipsft"
CORE = ("losses", "logprobs", "train")
BESIDE = ("errors", "devices", "char_tokenizer", "chat", "speed", "fused", "lora", "model",
          "gguf", "runs", "data")
TOP = ("cli", "trl_trainer", "__init__", "__main__")


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _imports(path: Path) -> set:
    """The minipsft modules ``path`` imports, as dotted names relative to the package."""
    here = path.relative_to(PACKAGE).parent.parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - node.level + 1]
            parts = list(base) + (node.module.split(".") if node.module else [])
            names = [a.name for a in node.names] if not node.module else [""]
            found |= {".".join(p for p in parts + [n] if p) for n in names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minipsft."):
            found.add(node.module.removeprefix("minipsft."))
    return found


def _floor(module: str) -> int:
    top = module.split(".")[0]
    if top in CORE:
        return 1
    if top in BESIDE:
        return 2
    if top == "lab":
        return 3
    assert top in TOP, f"{module}: not placed on a floor (add it to tests/test_layout.py)"
    return 4


def test_nothing_imports_upward_and_the_core_imports_only_the_core():
    upward = []
    for path in _modules():
        me = _name(path)
        for other in _imports(path):
            if _floor(other) > _floor(me) or (_floor(me) == 1 and _floor(other) != 1):
                upward.append(f"{me} imports {other}")
    assert not upward, upward


def test_no_function_over_60_lines_no_module_over_400_no_line_over_100():
    too_long = []
    for path in _modules():
        text = path.read_text()
        lines = text.splitlines()
        if len(lines) > 400:
            too_long.append(f"module {_name(path)}: {len(lines)} lines")
        too_long += [f"{_name(path)}:{i}: {len(line)} characters"
                     for i, line in enumerate(lines, 1) if len(line) > 100]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    too_long.append(f"{_name(path)}.{node.name}: {length} lines")
    assert not too_long, too_long


def test_the_core_reads_in_an_evening():
    sizes = {m: len((PACKAGE / f"{m}.py").read_text().splitlines()) for m in CORE}
    assert sum(sizes.values()) <= 700, sizes


def test_no_module_imports_another_modules_private_names():
    private = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or "minipsft" in (node.module or "")):
                private += [f"{_name(path)}: {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, private


def test_importing_the_core_loads_no_lab_cli_trl_or_peft():
    code = ("import sys, minipsft.losses, minipsft.logprobs, minipsft.train; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trl', 'peft') "
            "or m.startswith(('minipsft.lab', 'minipsft.cli', 'minipsft.trl_trainer'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PACKAGE.parent, check=True).stdout.strip()
    assert loaded == "[]", loaded


def test_the_readmes_reading_order_gives_each_files_line_count():
    """The README's reading order says how long each file (or the lab folder) is: kept true."""
    readme = (PACKAGE.parent / "README.md").read_text()
    named = [line for line in readme.splitlines() if re.match(r"\s+(\d\. )?minipsft/", line)]
    listed = re.findall(r"minipsft/(\S*)\s+\((\d+) lines\)", readme)
    assert len(listed) == len(named) >= 10, named  # every file named there gives its count
    for name, count in listed:
        files = sorted((PACKAGE / name).rglob("*.py")) if name.endswith("/") else [PACKAGE / name]
        actual = sum(len(f.read_text().splitlines()) for f in files)
        assert actual == int(count), (name, actual, int(count))
