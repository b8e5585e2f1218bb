"""Read and validate a PEFT LoRA adapter directory.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the
legacy pickled ``adapter_model.bin``), as written by ``peft``'s ``save_pretrained``. This module
checks that the adapter fits the base model and uses no feature the engine does not implement,
and gives per ``(layer, projection)`` the ``A`` and ``B`` matrices and the scale ``peft`` would
apply, in one of two forms:

* :func:`read_adapter` -> :class:`StoredAdapter`, the serving path: the tensors as the file stores
  them, views of one buffer the file is read into once (after everything the header shows has
  been validated), with the content hash computed on shared I/O threads meanwhile. The store packs
  it straight into the pool layout (``loraserve.lora.pool.pack_adapter``).
* :func:`load_adapter` -> :class:`LoRAWeights`: float32 copies, for references, tests and
  adapters built in memory.

Every refusal is an :class:`AdapterError` whose message names the adapter, what is wrong and why,
because it ends up in front of the user who asked to load the adapter.

The config is interpreted with ``peft``'s own rules (``peft.tuners.tuners_utils.
check_target_module_exists`` for ``target_modules``/``exclude_modules``/``layers_to_transform``,
``peft.utils.other.get_pattern_key`` for ``rank_pattern``/``alpha_pattern``), re-implemented here
because ``peft`` is not a runtime dependency of the engine.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")
X = TypeVar("X")

LORA_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The submodule of a decoder layer that holds each projection in Llama-family checkpoints.
_PARENT: Mapping[str, str] = MappingProxyType(
    {m: ("self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for m in LORA_MODULES}
)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

# Config switches for LoRA variants whose forward pass is not plain ``x @ A^T @ B^T * scale`` on the
# seven projections (or that change the base model); any truthy value makes the adapter unusable.
_UNSUPPORTED_FEATURES: Mapping[str, str] = MappingProxyType(
    {
        "use_dora": "DoRA (use_dora) adds a magnitude vector and a column normalisation",
        "use_qalora": "QALoRA (use_qalora) pools the input features before A",
        "alora_invocation_tokens": "activated LoRA (aLoRA) applies the adapter only after an invocation sequence",
        "layer_replication": "layer_replication changes the base model's layer stack",
        "trainable_token_indices": "trainable_token_indices trains embedding rows",
        "target_parameters": "target_parameters puts LoRA on raw parameters (e.g. MoE experts)",
        "arrow_config": "Arrow routing (arrow_config) mixes several LoRAs per token",
        "use_bdlora": "block-diagonal LoRA (use_bdlora) stores A/B in a different layout",
        "kasa_config": "KaSA (kasa_config) adds singular-value parameters",
        "monteclora_config": "MonteCLoRA (monteclora_config) samples the LoRA weights",
    }
)

# Initialisations that rewrite the base weights during training: unless the adapter was converted
# back on save (which resets ``init_lora_weights`` to true), it is only correct on the residual base.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# ``<module path>.lora_A[.<adapter name>].weight``; peft writes the adapter name only in some versions.
_TENSOR_KEY_RE = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_PEFT_PREFIX = "base_model.model."
# A decoder-layer projection of a Llama-family causal LM (``model.layers.N...``) or bare model.
_LAYER_PATH_RE = re.compile(r"^(?:model\.)?layers\.(?P<layer>\d+)\.(?P<parent>[^.]+)\.(?P<module>[^.]+)$")
# Module names of the input embedding and the LM head, to refuse regex targets that reach them.
_EMBEDDING_KEYS = ("model.embed_tokens", "lm_head")
_EMBEDDING_NAMES = ("embed_tokens", "lm_head", "embedding", "wte", "wpe")


class AdapterError(ValueError):
    """An adapter was refused; the message says which adapter, what is wrong and why."""


@dataclass(frozen=True)
class LoRAModelSpec:
    """What the base model offers to adapters.

    ``shapes`` maps each projection the base model has (a subset of :data:`LORA_MODULES`) to its
    ``(in_features, out_features)``; every decoder layer has the same shapes.
    """

    num_layers: int
    shapes: Mapping[str, tuple[int, int]]
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.shapes) - set(LORA_MODULES)
        if unknown:
            raise ValueError(f"LoRAModelSpec.shapes has modules outside LORA_MODULES: {sorted(unknown)}")


@dataclass(frozen=True, eq=False)
class LoRAModuleWeights:
    """One projection's LoRA: ``delta(x) = scale * (x @ a.T) @ b.T``.

    ``a`` is ``[r, in_features]`` and ``b`` is ``[out_features, r]`` (peft's ``lora_A.weight`` and
    ``lora_B.weight``), both float32 and contiguous on the CPU.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        """This module's rank ``r`` (rows of ``a``)."""
        return self.a.shape[0]


class _AdapterModules:
    """What :class:`LoRAWeights` and :class:`StoredAdapter` share: per-module weights and their summaries.

    ``modules`` maps ``(layer_index, module_name)`` to objects with ``a`` (``[r, in]``), ``b``
    (``[out, r]``) and ``scale``, in model order (layer, then :data:`LORA_MODULES` order).
    """

    name: str
    path: str
    modules: Mapping[tuple[int, str], Any]

    @property
    def nbytes(self) -> int:
        """Bytes of all ``a`` and ``b`` tensors as float32 (the adapter's size as the store reports it)."""
        return sum(4 * (w.a.numel() + w.b.numel()) for w in self.modules.values())

    @property
    def target_modules(self) -> frozenset[str]:
        """The projection names that have LoRA weights in at least one layer."""
        return frozenset(module for _, module in self.modules)

    @property
    def where(self) -> str:
        """How messages name the adapter: ``adapter 'name' (path)``."""
        return f"adapter {self.name!r} ({self.path})"

    def tensor_name(self, loc: tuple[int, str], ab: str) -> str:
        """How messages name module ``loc``'s ``lora_A``/``lora_B`` (``ab`` is ``"A"`` or ``"B"``)."""
        return f"{_short_name(*loc)}.lora_{ab}"


@dataclass(frozen=True, eq=False)
class LoRAWeights(_AdapterModules):
    """A validated adapter: every module's float32 weights and scale, ready to be packed into a pool.

    ``modules`` is keyed by ``(layer_index, module_name)``. ``content_hash`` identifies what the
    adapter computes (see :func:`hash_adapter`): equal hashes mean interchangeable adapters, so it
    can key caches; ``name`` and ``path`` do not enter it.
    """

    name: str
    path: str
    rank: int
    modules: Mapping[tuple[int, str], LoRAModuleWeights]
    content_hash: str


@dataclass(frozen=True, eq=False)
class StoredModule:
    """One projection's LoRA as the weights file stores it: ``delta(x) = scale * (x @ a.T) @ b.T``.

    ``a`` (``[r, in]``) and ``b`` (``[out, r]``) keep the file's dtype and are views of the one
    buffer the file was read into; ``a_key``/``b_key`` are their names in the file.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    a_key: str
    b_key: str


@dataclass(frozen=True, eq=False)
class StoredAdapter(_AdapterModules):
    """A validated adapter as stored on disk (see :func:`read_adapter`): no float32 copy is made.

    Every check that needs no weight value has passed; finiteness is checked where the weights are
    converted (:func:`load_adapter`, or ``pack_adapter`` in the serving dtype). The content hash is
    computed on the shared I/O threads while the caller packs; :attr:`content_hash` waits for it.
    """

    name: str
    path: str
    rank: int
    modules: Mapping[tuple[int, str], StoredModule]
    hash_result: Callable[[], str] = field(repr=False)

    @property
    def content_hash(self) -> str:
        """The adapter's identity (see :func:`hash_adapter`); blocks until hashing is done."""
        return self.hash_result()

    def tensor_name(self, loc: tuple[int, str], ab: str) -> str:
        """The name the weights file gives module ``loc``'s ``lora_A``/``lora_B``."""
        module = self.modules[loc]
        return module.a_key if ab == "A" else module.b_key


@dataclass(frozen=True)
class _Config:
    """The fields of ``adapter_config.json`` that decide which modules get LoRA and at what scale."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    target_modules: str | frozenset[str]
    exclude_modules: str | frozenset[str] | None
    layers_to_transform: int | frozenset[int] | None
    layers_pattern: tuple[str, ...] | None

    def targets(self, key: str) -> bool:
        """Whether peft puts LoRA on the module ``key`` (peft's ``check_target_module_exists``)."""
        if self.exclude_modules is not None and _name_matches(self.exclude_modules, key):
            return False
        if isinstance(self.target_modules, str):
            # peft forbids layers_to_transform with a regex: the regex alone decides.
            return re.fullmatch(self.target_modules, key) is not None
        if key in self.target_modules:
            # An exact full-name entry bypasses layers_to_transform in peft as well.
            return True
        if not any(key.endswith(f".{t}") for t in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        if self.layers_pattern is None:
            # Lazy ``.*?`` picks the first numbered segment, i.e. the layer index.
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            match = None
            for pattern in self.layers_pattern:
                match = re.match(_layers_regex(pattern), key)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        if isinstance(self.layers_to_transform, int):
            return index == self.layers_to_transform
        return index in self.layers_to_transform

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """The ``(r, lora_alpha)`` peft uses for module ``key``, honouring rank/alpha patterns."""
        r_key = _pattern_key(self.rank_pattern, key)
        alpha_key = _pattern_key(self.alpha_pattern, key)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[alpha_key] if alpha_key is not None else self.lora_alpha
        return r, alpha

    def scale(self, r: int, alpha: float) -> float:
        """peft's ``scaling``: ``alpha / r``, or ``alpha / sqrt(r)`` for rank-stabilised LoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def canonical(self) -> dict[str, Any]:
        """A JSON-ready form in which equivalent configs are equal (sets sorted, numbers normalised).

        Pattern dicts stay ordered lists because peft takes the first matching key.
        """

        def names(v: str | frozenset[str] | None) -> Any:
            return v if v is None or isinstance(v, str) else {"names": sorted(v)}

        layers = self.layers_to_transform
        return {
            "r": self.r,
            "lora_alpha": float(self.lora_alpha),
            "use_rslora": self.use_rslora,
            "rank_pattern": [[k, v] for k, v in self.rank_pattern.items()],
            "alpha_pattern": [[k, float(v)] for k, v in self.alpha_pattern.items()],
            "target_modules": names(self.target_modules),
            "exclude_modules": names(self.exclude_modules),
            "layers_to_transform": [layers]
            if isinstance(layers, int)
            else (sorted(layers) if layers else None),
            "layers_pattern": list(self.layers_pattern) if self.layers_pattern else None,
        }


def _name_matches(spec: str | frozenset[str], key: str) -> bool:
    """peft's module-name matching: a string is a full-match regex, a set matches exact or dotted suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith(f".{s}") for s in spec)


def _pattern_key_regex(pattern: str) -> str:
    """How peft's ``get_pattern_key`` embeds a rank/alpha_pattern key: a dotted-suffix match."""
    return rf"(.*\.)?({pattern})$"


def _layers_regex(pattern: str) -> str:
    """How peft embeds a ``layers_pattern`` entry to find the layer index (the first one: lazy)."""
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


def _pattern_key(patterns: Mapping[str, Any], key: str) -> str | None:
    """The first pattern that matches ``key`` as peft's ``get_pattern_key`` does, or None."""
    for pattern in patterns:
        if re.match(_pattern_key_regex(pattern), key):
            return pattern
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_config(raw: Any, where: str) -> _Config:
    """Validate ``adapter_config.json`` and keep what matters; refuse unsupported features."""
    if not isinstance(raw, dict):
        raise AdapterError(f"{where}: {CONFIG_NAME} must hold a JSON object, got {type(raw).__name__}")

    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(
            f"{where}: peft_type={peft_type!r} is not supported; loraserve serves LoRA adapters only "
            "(peft_type 'LORA')"
        )
    for key, why in _UNSUPPORTED_FEATURES.items():
        if raw.get(key):
            raise AdapterError(f"{where}: {key}={raw[key]!r} is not supported (yet): {why}")
    if raw.get("modules_to_save"):
        raise AdapterError(
            f"{where}: modules_to_save={raw['modules_to_save']!r} is not supported (yet): the adapter "
            "replaces whole base-model modules, which would need a per-adapter copy of them"
        )
    bias = raw.get("bias", "none")
    if bias != "none":
        raise AdapterError(
            f"{where}: bias={bias!r} is not supported (yet): the adapter trains base-model biases; "
            "only bias='none' adapters can share the base model"
        )
    if raw.get("lora_bias"):
        raise AdapterError(f"{where}: lora_bias=true is not supported (yet): LoRA B with a bias term")

    r = raw.get("r")
    if not _is_int(r) or r < 1:
        raise AdapterError(f"{where}: r must be a positive integer, got {r!r}")
    lora_alpha = raw.get("lora_alpha", 8)  # peft's default
    if not _is_number(lora_alpha):
        raise AdapterError(f"{where}: lora_alpha must be a finite number, got {lora_alpha!r}")
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterError(f"{where}: use_rslora must be true or false, got {use_rslora!r}")

    rank_pattern = raw.get("rank_pattern") or {}
    alpha_pattern = raw.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(_is_int(v) and v >= 1 for v in rank_pattern.values()):
        raise AdapterError(
            f"{where}: rank_pattern must map patterns to positive integers, got {rank_pattern!r}"
        )
    if not isinstance(alpha_pattern, dict) or not all(_is_number(v) for v in alpha_pattern.values()):
        raise AdapterError(f"{where}: alpha_pattern must map patterns to numbers, got {alpha_pattern!r}")

    target_modules = _parse_names(raw.get("target_modules"), "target_modules", where)
    if target_modules is None or not target_modules:
        raise AdapterError(f"{where}: adapter_config.json has no target_modules; nothing to apply LoRA to")
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        # peft's shorthand for every nn.Linear but the output layer: in a Llama-family model, the
        # seven projections. peft expands it before saving, but hand-written configs may keep it.
        target_modules = frozenset(LORA_MODULES)
    exclude_modules = _parse_names(raw.get("exclude_modules"), "exclude_modules", where)

    layers_to_transform = raw.get("layers_to_transform")
    layers: int | frozenset[int] | None
    if layers_to_transform is None or layers_to_transform == []:
        # peft treats an empty list as "all layers".
        layers = None
    elif _is_int(layers_to_transform):
        layers = layers_to_transform
    elif isinstance(layers_to_transform, list) and all(_is_int(i) for i in layers_to_transform):
        layers = frozenset(layers_to_transform)
    else:
        raise AdapterError(
            f"{where}: layers_to_transform must be an integer or a list of integers, got {layers_to_transform!r}"
        )
    layers_pattern_raw = raw.get("layers_pattern")
    layers_pattern: tuple[str, ...] | None
    if not layers_pattern_raw:
        layers_pattern = None
    elif isinstance(layers_pattern_raw, str):
        layers_pattern = (layers_pattern_raw,)
    elif isinstance(layers_pattern_raw, list) and all(isinstance(p, str) for p in layers_pattern_raw):
        layers_pattern = tuple(layers_pattern_raw)
    else:
        raise AdapterError(
            f"{where}: layers_pattern must be a string or a list of strings, got {layers_pattern_raw!r}"
        )
    if isinstance(target_modules, str) and (layers is not None or layers_pattern is not None):
        raise AdapterError(
            f"{where}: layers_to_transform/layers_pattern cannot be used with a regex target_modules "
            "(peft refuses it)"
        )

    # Every user-supplied pattern is a regex for peft; a broken one is a broken config, caught here
    # rather than as re.error in the middle of matching. Patterns are compiled embedded the way they
    # are used, since e.g. an inline flag is valid alone but not inside a larger expression.
    patterns = {k: _pattern_key_regex(k) for k in [*rank_pattern, *alpha_pattern]}
    patterns.update({p: _layers_regex(p) for p in layers_pattern or ()})
    patterns.update({spec: spec for spec in (target_modules, exclude_modules) if isinstance(spec, str)})
    for pattern, embedded in patterns.items():
        try:
            re.compile(embedded)
        except re.error as e:
            raise AdapterError(
                f"{where}: invalid regular expression {pattern!r} in adapter_config.json: {e}"
            ) from e
    _check_targets_supported(target_modules, where)

    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        logger.warning(
            "%s: init_lora_weights=%r rewrites the base weights during training; outputs are only right "
            "if the engine serves the matching residual base model",
            where,
            init,
        )

    return _Config(
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        rank_pattern=MappingProxyType(dict(rank_pattern)),
        alpha_pattern=MappingProxyType(dict(alpha_pattern)),
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        layers_to_transform=layers,
        layers_pattern=layers_pattern,
    )


def _parse_names(value: Any, field: str, where: str) -> str | frozenset[str] | None:
    """A peft module-name spec: a regex string, or a list of names (a set for peft)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    raise AdapterError(f"{where}: {field} must be a string or a list of strings, got {value!r}")


def _check_targets_supported(target_modules: str | frozenset[str], where: str) -> None:
    """Refuse targets outside the seven projections before reading any weights."""
    if isinstance(target_modules, str):
        # A regex cannot be enumerated; probe the modules that matter. Anything else it reaches
        # shows up as a tensor and is refused there.
        reached = [k for k in _EMBEDDING_KEYS if re.fullmatch(target_modules, k)]
        if reached:
            raise AdapterError(
                f"{where}: target_modules regex {target_modules!r} matches {reached}; LoRA on the embedding "
                f"or lm_head is not supported (yet): only {', '.join(LORA_MODULES)} can be adapted"
            )
        return
    for entry in sorted(target_modules):
        leaf = entry.rsplit(".", 1)[-1]
        if leaf not in LORA_MODULES:
            kind = "the embedding or lm_head" if leaf in _EMBEDDING_NAMES else f"module {entry!r}"
            raise AdapterError(
                f"{where}: target module {entry!r} is not supported (yet): LoRA on {kind} is not "
                f"implemented; only {', '.join(LORA_MODULES)} can be adapted"
            )


# --- reading the weights file ------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorMeta:
    """A tensor as the weights file's header describes it (no data read)."""

    # A dtype torch has no type for stays a string (the safetensors name), refused by name later.
    dtype: torch.dtype | str
    shape: tuple[int, ...]


# safetensors dtype names -> torch dtypes; only the float ones get past validation.
_SAFETENSORS_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
)

# Work of one adapter is split across the shared I/O threads in runs of at least this many bytes,
# so that small adapters are read, hashed and packed inline, without hand-offs.
_PARALLEL_GRAIN = 4 << 20

# Threads for byte-level work: the CPUs this process may use, at most 8, which read, hash and
# pack 80 MB in a few milliseconds each on a server. On the H200 host (16 CPUs) a cap of 16 made
# the disk -> GPU cold load slower (61 vs 47 ms), competing with torch's own threads.
_IO_THREADS = max(
    1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
)


def _new_io_pool() -> ThreadPoolExecutor:
    """The threads shared by every adapter read for byte-level work (started on first use)."""
    return ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="lora-io")


_io_pool = _new_io_pool()


def _reset_io_pool() -> None:
    # A forked child has none of the parent's threads, but its copy of the pool believes it has.
    global _io_pool
    _io_pool = _new_io_pool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_io_pool)


def in_io_threads(
    fn: Callable[[Sequence[X]], T], items: Sequence[X], sizes: Sequence[int]
) -> list[Future[T]]:
    """Start ``fn`` on consecutive runs of ``items`` of about equal bytes (``sizes``), on the I/O threads.

    Futures in run order (none for no items): at most ``_IO_THREADS`` runs of at least
    ``_PARALLEL_GRAIN`` bytes; a single run (small work, or one CPU) runs inline and is done on
    return. ``fn`` must release the GIL for most of its time (file reads, hashlib on large
    buffers, numpy copies) -- that is what makes the threads parallel -- and must not run torch
    kernels, whose own thread pool would then be entered from many threads at once; and it must
    not wait on other runs, so that reads in flight on several reader threads cannot deadlock the
    shared threads.
    """
    if not items:
        return []
    ends = list(itertools.accumulate(sizes))
    total = ends[-1]
    pieces = max(1, min(_IO_THREADS, total // _PARALLEL_GRAIN))
    if pieces == 1:
        done: Future[T] = Future()
        done.set_result(fn(items))
        return [done]
    # Run k takes the items that end in (k/pieces, (k+1)/pieces] of the bytes.
    cuts = [0, *(bisect.bisect_right(ends, total * k // pieces) for k in range(1, pieces)), len(items)]
    return [_io_pool.submit(fn, items[lo:hi]) for lo, hi in itertools.pairwise(cuts) if lo < hi]


def _parse_safetensors_header(f: BinaryIO, size: int) -> tuple[dict[str, tuple[_TensorMeta, int, int]], int]:
    """The tensors of an open safetensors file: ``name -> (meta, begin, end)``, plus where data starts.

    ``begin``/``end`` are byte offsets into the data section. Raises ValueError for whatever the
    format forbids (the rules the safetensors library enforces): a header running past the end of
    the file, a malformed entry, a byte span that does not match dtype and shape, and tensor data
    that does not tile the data section exactly (gaps, overlaps, a truncated file).
    """
    if size < 8:
        raise ValueError(f"the file has {size} bytes, fewer than the 8-byte header length")
    header_len = int.from_bytes(f.read(8), "little")
    if header_len > size - 8:
        raise ValueError(f"the header length {header_len} runs past the end of the file ({size} bytes)")
    header = json.loads(f.read(header_len))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    entries: dict[str, tuple[_TensorMeta, int, int]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"tensor {key!r} has a malformed header entry {info!r}") from e
        if not (
            isinstance(dtype_name, str)
            and isinstance(shape, list)
            and all(_is_int(d) and d >= 0 for d in shape)
            and _is_int(begin)
            and _is_int(end)
            and 0 <= begin <= end
        ):
            raise ValueError(f"tensor {key!r} has a malformed header entry {info!r}")
        dtype = _SAFETENSORS_DTYPES.get(dtype_name, dtype_name)
        if isinstance(dtype, torch.dtype) and end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(
                f"tensor {key!r} ({dtype_name} {shape}) needs {math.prod(shape) * dtype.itemsize} bytes "
                f"but its data_offsets span {end - begin}"
            )
        entries[key] = (_TensorMeta(dtype, tuple(shape)), begin, end)
    data_len = size - 8 - header_len
    cursor = 0
    for key, (_, begin, end) in sorted(entries.items(), key=lambda item: item[1][1:]):
        if begin != cursor:
            raise ValueError(
                f"tensor {key!r} starts at data byte {begin}, not where the previous ended ({cursor})"
            )
        cursor = end
    if cursor != data_len:
        raise ValueError(f"the header describes {cursor} bytes of tensor data but the file holds {data_len}")
    return entries, 8 + header_len


def _read_safetensors_data(
    fd: int, entries: Mapping[str, tuple[_TensorMeta, int, int]], offset: int, nbytes: int, pin: bool
) -> dict[str, torch.Tensor]:
    """Read the data section once into one buffer, in parallel pieces, and view each tensor in it.

    A private copy rather than a memory map: the tensors, their hash and the packed copy all come
    from the same bytes even if the file is rewritten meanwhile, and a file truncated under the
    reader is a refusal rather than a SIGBUS. ``pin`` takes the buffer from torch's caching host
    allocator (CUDA only), which hands a finished read's buffer to the next one: fresh memory
    would cost a page fault per 4 KiB, tens of milliseconds for a 7B-sized adapter. Raises
    ValueError when the file ends early.
    """
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    view = memoryview(buf.numpy())
    spans = sorted((begin, end) for _, begin, end in entries.values())  # they tile [0, nbytes)

    def read(run: Sequence[tuple[int, int]]) -> None:
        lo, hi = run[0][0], run[-1][1]
        while lo < hi:
            n = os.preadv(fd, [view[lo:hi]], offset + lo)
            if n == 0:
                raise ValueError(f"the file ended {hi - lo} bytes early (truncated while being read?)")
            lo += n

    runs = in_io_threads(read, spans, [end - begin for begin, end in spans])
    wait(runs)  # all of them, even after a failure: none may outlive the file it reads
    for run in runs:
        run.result()
    tensors = {}
    for key, (meta, begin, end) in entries.items():
        assert isinstance(meta.dtype, torch.dtype)  # validation refused every other dtype
        raw = buf[begin:end]
        if begin % meta.dtype.itemsize:
            # A dtype view needs aligned data. The safetensors writer aligns every tensor, other
            # writers need not: such a tensor gets its own (aligned) copy.
            raw = raw.clone()
        tensors[key] = raw.view(meta.dtype).view(meta.shape)
    return tensors


@contextmanager
def _open_weights(
    path: Path, where: str, pin: bool = False
) -> Iterator[tuple[dict[str, _TensorMeta], Callable[[], dict[str, torch.Tensor]]]]:
    """Open the weights file (safetensors preferred, as peft does): its tensors' metadata and a reader.

    The metadata comes from the safetensors header alone, so the adapter can be validated before
    any weight is read; the reader then reads the tensors from the same open file (into pinned
    memory with ``pin``, see :func:`_read_safetensors_data`). Any parse failure is an
    :class:`AdapterError`.
    """
    st_path = path / SAFETENSORS_NAME
    bin_path = path / BIN_NAME
    if st_path.is_file():
        problem = f"{where}: cannot read {SAFETENSORS_NAME} (corrupt or truncated?)"
        try:
            f = open(st_path, "rb")  # noqa: SIM115 - closed by the with below, past the yield
        except OSError as e:
            raise AdapterError(f"{problem}: {e}") from e
        with f:
            try:
                entries, offset = _parse_safetensors_header(f, os.fstat(f.fileno()).st_size)
            except (OSError, ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
                raise AdapterError(f"{problem}: {e}") from e
            nbytes = max((end for _, _, end in entries.values()), default=0)

            def read() -> dict[str, torch.Tensor]:
                try:
                    return _read_safetensors_data(f.fileno(), entries, offset, nbytes, pin)
                except (OSError, ValueError) as e:
                    raise AdapterError(f"{problem}: {e}") from e

            yield {key: meta for key, (meta, _, _) in entries.items()}, read
        return
    if not bin_path.is_file():
        raise AdapterError(
            f"{where}: no weights file; expected {SAFETENSORS_NAME} or {BIN_NAME} next to {CONFIG_NAME}"
        )
    try:
        # weights_only: a pickled adapter must not be able to run code in the server.
        tensors: Any = torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling raises many types (UnpicklingError, EOFError, RuntimeError...)
        raise AdapterError(
            f"{where}: cannot read {BIN_NAME} (corrupt, truncated or not a state dict?): {e}"
        ) from e
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise AdapterError(f"{where}: the weights file does not hold a flat mapping of names to tensors")
    yield {k: _TensorMeta(v.dtype, tuple(v.shape)) for k, v in tensors.items()}, lambda: tensors


def _unsupported_tensor(key: str) -> str:
    """Why a tensor that is not a LoRA A/B weight cannot be served."""
    if "lora_embedding_" in key:
        return "LoRA on an embedding is not supported (yet)"
    if "lora_magnitude_vector" in key:
        return "DoRA magnitude vectors are not supported (yet)"
    if re.search(r"\.lora_B(\.[^.]+)?\.bias$", key):
        return "a LoRA B bias (lora_bias) is not supported (yet)"
    return "it is not a LoRA A/B weight (trained base-model weights such as modules_to_save are not supported (yet))"


# --- identity ----------------------------------------------------------------------------------


def _start_hash(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Callable[[], str]:
    """Start :func:`hash_adapter` on the shared I/O threads; the returned function waits for it.

    The tensors must not change until the result has been taken.
    """
    names = sorted(tensors)
    # A uint8 view gives the raw bytes for every dtype, bfloat16 included (numpy has none).
    data = [tensors[n].detach().contiguous().reshape(-1).view(torch.uint8).numpy() for n in names]
    runs = in_io_threads(
        lambda run: [hashlib.sha256(d).digest() for d in run], data, [d.nbytes for d in data]
    )

    @functools.cache
    def result() -> str:
        h = hashlib.sha256(b"loraserve-adapter-v2\0")
        h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
        each = itertools.chain.from_iterable(run.result() for run in runs)
        for name, digest in zip(names, each, strict=True):
            t = tensors[name]
            h.update(f"\0{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode() + digest)
        return h.hexdigest()

    return result


def hash_adapter(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex of an adapter's output-relevant content.

    ``config`` is the canonical config (JSON-serialisable; keys sorted here) and ``tensors`` maps
    canonical tensor names to the tensors as stored on disk. Each tensor contributes, in name
    order, its name, dtype, shape and the sha256 of its raw bytes (hashed in parallel); dtype and
    shape fix the byte length and digests have a fixed length, so the stream is unambiguous. The
    same content always hashes equal; any change of a byte, rank, alpha or target changes it.
    """
    return _start_hash(config, tensors)()


# --- validation and loading --------------------------------------------------------------------


def _short_name(layer: int, module: str) -> str:
    """A module's canonical path, ``layers.N.<parent>.<module>``, as messages and the hash name it."""
    return f"layers.{layer}.{_PARENT[module]}.{module}"


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite.

    One reduction pass with no temporary the size of ``t`` (``isfinite`` makes one, and is slow on
    CPU for half types): NaN propagates through min and max, and an infinity is the min or max.
    """
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def nonfinite_error(where: str, tensor: str, dtype: torch.dtype, scale: float | None = None) -> AdapterError:
    """The refusal of an adapter whose tensor ``tensor`` is not finite once converted to ``dtype``."""
    scaled = "" if scale is None else f" once scaled by {scale:g}"
    return AdapterError(
        f"{where}: tensor {tensor!r} contains NaN or Inf (or overflows {str(dtype).removeprefix('torch.')}"
        f"{scaled}); the adapter is broken"
    )


def read_adapter(
    path: str | os.PathLike[str],
    spec: LoRAModelSpec,
    max_rank: int,
    name: str | None = None,
    pin: bool = False,
) -> StoredAdapter:
    """Read and validate ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``) as stored.

    ``name`` defaults to the directory name. Everything the config and the tensor header show is
    checked before any weight is read; the weights file is then read once, into one buffer that
    the returned tensors are views of (pinned with ``pin``: for CUDA hosts, where pinned buffers
    are recycled), and its content hash starts on the shared I/O threads.
    Raises :class:`AdapterError` (and nothing else) when the adapter is unreadable, uses a feature
    the engine does not implement, does not fit ``spec`` or has a rank above ``max_rank``.
    Finiteness is left to whoever converts the weights (see :class:`StoredAdapter`).
    """
    resolved = Path(path).expanduser().resolve()
    adapter_name = name if name is not None else resolved.name
    where = f"adapter {adapter_name!r} ({resolved})"

    if not resolved.is_dir():
        what = "is not a directory" if resolved.exists() else "does not exist"
        raise AdapterError(f"{where}: the adapter path {what}")
    config_path = resolved / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{where}: missing {CONFIG_NAME}; not a PEFT adapter directory")
    try:
        raw_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # JSON and UTF-8 decode errors are ValueErrors
        raise AdapterError(f"{where}: cannot parse {CONFIG_NAME}: {e}") from e
    config = _parse_config(raw_config, where)

    with _open_weights(resolved, where, pin) as (metas, read):
        plan = _plan_modules(metas, config, spec, max_rank, where)
        tensors = read()
    modules = {
        loc: StoredModule(a=tensors[a_key], b=tensors[b_key], scale=scale, a_key=a_key, b_key=b_key)
        for loc, (a_key, b_key, scale) in plan.items()
    }
    # Canonical names, so that the naming variants peft has used over time hash equal.
    canonical = {
        f"{_short_name(*loc)}.lora_{ab}": t
        for loc, m in modules.items()
        for ab, t in (("A", m.a), ("B", m.b))
    }
    stored = StoredAdapter(
        name=adapter_name,
        path=str(resolved),
        rank=max(m.a.shape[0] for m in modules.values()),
        modules=MappingProxyType(modules),
        hash_result=_start_hash(config.canonical(), canonical),
    )
    logger.info(
        "read adapter %r from %s: %d modules (%s), rank %d, %.2f MiB as float32",
        adapter_name,
        resolved,
        len(modules),
        ",".join(sorted(stored.target_modules)),
        stored.rank,
        stored.nbytes / 2**20,
    )
    return stored


def load_adapter(
    path: str | os.PathLike[str], spec: LoRAModelSpec, max_rank: int, name: str | None = None
) -> LoRAWeights:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``adapter_model.bin``).

    ``name`` defaults to the directory name. Tensors are converted to float32 (and must be finite
    there). Raises :class:`AdapterError` (and nothing else) when the adapter is unreadable, uses a
    feature the engine does not implement, does not fit ``spec`` or has a rank above ``max_rank``.
    """
    stored = read_adapter(path, spec, max_rank, name)
    modules: dict[tuple[int, str], LoRAModuleWeights] = {}
    for loc, m in stored.modules.items():
        a32 = m.a.to(torch.float32).contiguous()
        b32 = m.b.to(torch.float32).contiguous()
        for key, t in ((m.a_key, a32), (m.b_key, b32)):
            if not all_finite(t):
                raise nonfinite_error(stored.where, key, torch.float32)
        modules[loc] = LoRAModuleWeights(a=a32, b=b32, scale=m.scale)
    return LoRAWeights(
        name=stored.name,
        path=stored.path,
        rank=stored.rank,
        modules=MappingProxyType(modules),
        content_hash=stored.content_hash,
    )


def _plan_modules(
    metas: Mapping[str, _TensorMeta], config: _Config, spec: LoRAModelSpec, max_rank: int, where: str
) -> dict[tuple[int, str], tuple[str, str, float]]:
    """Pair A and B per module and validate them against ``config`` and ``spec`` from metadata alone.

    Returns ``(layer, module) -> (lora_A key, lora_B key, scale)`` in model order (layer, then
    :data:`LORA_MODULES` order), so that messages name the first offender.
    """
    # (layer, module) -> {"A"|"B": key}; plus the module path peft matches the config on.
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    module_keys: dict[tuple[int, str], str] = {}
    for key in sorted(metas):
        match = _TENSOR_KEY_RE.match(key)
        if match is None:
            raise AdapterError(f"{where}: tensor {key!r} cannot be served: {_unsupported_tensor(key)}")
        module_path = match.group("path").removeprefix(_PEFT_PREFIX)
        loc = _LAYER_PATH_RE.match(module_path)
        leaf = module_path.rsplit(".", 1)[-1]
        if (
            loc is None
            or loc.group("module") not in LORA_MODULES
            or _PARENT[loc.group("module")] != loc.group("parent")
        ):
            kind = "the embedding or lm_head" if leaf in _EMBEDDING_NAMES else module_path
            raise AdapterError(
                f"{where}: tensor {key!r}: LoRA on {kind} is not supported (yet); only "
                f"{', '.join(LORA_MODULES)} of the decoder layers can be adapted"
            )
        layer, module = int(loc.group("layer")), loc.group("module")
        short = _short_name(layer, module)
        if module not in spec.shapes:
            raise AdapterError(
                f"{where}: the adapter has weights for {short} but the base model has no {module} "
                f"(it offers {', '.join(m for m in LORA_MODULES if m in spec.shapes)}); "
                "the adapter was trained for a different model"
            )
        if layer >= spec.num_layers:
            raise AdapterError(
                f"{where}: the adapter has weights for {short} but the base model has only "
                f"{spec.num_layers} layers; the adapter was trained for a different model"
            )
        if not config.targets(module_path):
            raise AdapterError(
                f"{where}: the weights file has {key!r} but adapter_config.json does not target "
                f"{module_path} (target_modules={_describe(config.target_modules)}, "
                f"layers_to_transform={_describe(config.layers_to_transform)}); peft would ignore "
                "these weights, so config and weights disagree"
            )
        slot = pairs.setdefault((layer, module), {})
        ab = match.group("ab")
        if ab in slot:
            raise AdapterError(f"{where}: tensors {slot[ab]!r} and {key!r} are both lora_{ab} of {short}")
        slot[ab] = key
        module_keys[(layer, module)] = module_path

    if not pairs:
        raise AdapterError(f"{where}: the weights file holds no LoRA tensors (lora_A/lora_B)")

    plan: dict[tuple[int, str], tuple[str, str, float]] = {}
    ranks: dict[tuple[int, str], int] = {}
    for (layer, module), slot in sorted(
        pairs.items(), key=lambda item: (item[0][0], LORA_MODULES.index(item[0][1]))
    ):
        short = _short_name(layer, module)
        missing = [f"lora_{ab}" for ab in ("A", "B") if ab not in slot]
        if missing:
            raise AdapterError(f"{where}: {short} has no {missing[0]} tensor; the weights file is incomplete")
        a_key, b_key = slot["A"], slot["B"]
        for key in (a_key, b_key):
            if metas[key].dtype not in _SUPPORTED_DTYPES:
                raise AdapterError(
                    f"{where}: tensor {key!r} has dtype {metas[key].dtype}; only float32, float16, "
                    "bfloat16 (and float64) weights are supported"
                )
            if len(metas[key].shape) != 2:
                raise AdapterError(
                    f"{where}: tensor {key!r} has shape {list(metas[key].shape)}; LoRA weights are matrices"
                )
        a_shape, b_shape = metas[a_key].shape, metas[b_key].shape
        in_features, out_features = spec.shapes[module]
        rank = a_shape[0]
        if b_shape[1] != rank:
            raise AdapterError(
                f"{where}: A/B rank mismatch in {short}: lora_A is {list(a_shape)} (rank {rank}) but "
                f"lora_B is {list(b_shape)} (rank {b_shape[1]})"
            )
        if a_shape[1] != in_features or b_shape[0] != out_features:
            raise AdapterError(
                f"{where}: {short} maps {a_shape[1]} -> {b_shape[0]} features but the base model's "
                f"{module} maps {in_features} -> {out_features}; the adapter was trained for a different model"
            )
        config_rank, alpha = config.rank_and_alpha(module_keys[(layer, module)])
        if config_rank != rank:
            raise AdapterError(
                f"{where}: {short} has rank {rank} in the weights but adapter_config.json gives "
                f"r={config_rank} (from r/rank_pattern); config and weights disagree"
            )
        plan[(layer, module)] = (a_key, b_key, config.scale(rank, alpha))
        ranks[(layer, module)] = rank

    # Checked over all modules so that the message gives the rank the engine actually needs.
    (layer, module), top = max(ranks.items(), key=lambda item: item[1])
    if top > max_rank:
        raise AdapterError(
            f"{where}: rank {top} of {_short_name(layer, module)} exceeds max_lora_rank={max_rank}; "
            "start the engine with a larger max_lora_rank"
        )
    return plan


def _describe(value: Any) -> str:
    """Config values in messages: sets sorted so that messages are stable."""
    return repr(sorted(value)) if isinstance(value, frozenset) else repr(value)
