"""What is wrong with a local model directory that transformers could not load: the first file that is damaged.

transformers reports a truncated tokenizer.json as "Expecting ',' delimiter: line 71 column 4" and a cut
safetensors file as a Rust error, neither naming the file. When loading fails, the directory's JSON files, the
headers and sizes of its safetensors files and the GGUF file are read here, and the first bad one is named.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

REFETCH = "the file is damaged or cut short; copy or download the model again"


def damaged_file(directory: Path, gguf: str | None = None) -> str | None:
    """One line naming the first damaged file of `directory` (and why), or None when every file reads."""
    if not directory.is_dir():
        return None
    checks = [*((p, _json_problem) for p in sorted(directory.glob("*.json"))),
              *((p, _safetensors_problem) for p in sorted(directory.glob("*.safetensors")))]
    if gguf:
        checks.append((directory / gguf, _gguf_problem))
    for path, problem in checks:
        found = problem(path) if path.is_file() else None
        if found:
            return f"{path}: {found}; {REFETCH}"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte {e.start + 1})"
    except json.JSONDecodeError as e:
        return f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """The 8-byte header length, the JSON header, and every tensor's bytes within the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"not a safetensors file ({size} bytes)"
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            return f"cut short: its header needs {8 + n:,d} bytes, the file has {size:,d}"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "not a safetensors file (its header is not JSON)"
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    need = 8 + n + max(ends, default=0)
    return f"cut short: its tensors need {need:,d} bytes, the file has {size:,d}" if need > size else None


def _gguf_problem(path: Path) -> str | None:
    try:
        import gguf

        gguf.GGUFReader(path)
    except ImportError:
        return None
    except Exception as e:  # the reader's own errors (reshape, struct, value) for a cut or foreign file
        return f"not a readable GGUF file ({type(e).__name__}: {e})"
    return None
