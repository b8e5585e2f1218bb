"""Read and validate a PEFT LoRA adapter directory into float32 CPU tensors.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the
legacy pickled ``adapter_model.bin``), as written by ``peft``'s ``save_pretrained``. This module
turns it into a :class:`LoRAWeights`: per ``(layer, projection)`` the ``A`` and ``B`` matrices and
the scale ``peft`` would apply, after checking that the adapter fits the base model and uses no
feature the engine does not implement. Every refusal is an :class:`AdapterError` whose message
names the adapter, what is wrong and why, because it ends up in front of the user who asked to
load the adapter.

The config is interpreted with ``peft``'s own rules (``peft.tuners.tuners_utils.
check_target_module_exists`` for ``target_modules``/``exclude_modules``/``layers_to_transform``,
``peft.utils.other.get_pattern_key`` for ``rank_pattern``/``alpha_pattern``), re-implemented here
because ``peft`` is not a runtime dependency of the engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import load_file

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True, eq=False)
class LoRAWeights:
    """A validated adapter: every module's weights and scale, ready to be copied into a device pool.

    ``modules`` is keyed by ``(layer_index, module_name)``. ``content_hash`` identifies what the
    adapter computes (see :func:`hash_adapter`): equal hashes mean interchangeable adapters, so it
    can key caches; ``name`` and ``path`` do not enter it.
    """

    name: str
    path: str
    rank: int
    modules: Mapping[tuple[int, str], LoRAModuleWeights]
    content_hash: str

    @property
    def nbytes(self) -> int:
        """Bytes of all ``a`` and ``b`` tensors (what the adapter occupies in host memory)."""
        return sum(w.a.nbytes + w.b.nbytes for w in self.modules.values())

    @property
    def target_modules(self) -> frozenset[str]:
        """The projection names that have LoRA weights in at least one layer."""
        return frozenset(module for _, module in self.modules)


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


def _read_tensors(path: Path, where: str) -> dict[str, torch.Tensor]:
    """Read the weights file, preferring safetensors as peft does; any parse failure is refused."""
    st_path = path / SAFETENSORS_NAME
    bin_path = path / BIN_NAME
    if st_path.is_file():
        try:
            tensors: Any = load_file(st_path, device="cpu")
        except Exception as e:  # safetensors raises its own error type, OSError or ValueError
            raise AdapterError(f"{where}: cannot read {SAFETENSORS_NAME} (corrupt or truncated?): {e}") from e
    elif bin_path.is_file():
        try:
            # weights_only: a pickled adapter must not be able to run code in the server.
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling raises many types (UnpicklingError, EOFError, RuntimeError...)
            raise AdapterError(
                f"{where}: cannot read {BIN_NAME} (corrupt, truncated or not a state dict?): {e}"
            ) from e
    else:
        raise AdapterError(
            f"{where}: no weights file; expected {SAFETENSORS_NAME} or {BIN_NAME} next to {CONFIG_NAME}"
        )
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise AdapterError(f"{where}: the weights file does not hold a flat mapping of names to tensors")
    return tensors


def _unsupported_tensor(key: str) -> str:
    """Why a tensor that is not a LoRA A/B weight cannot be served."""
    if "lora_embedding_" in key:
        return "LoRA on an embedding is not supported (yet)"
    if "lora_magnitude_vector" in key:
        return "DoRA magnitude vectors are not supported (yet)"
    if re.search(r"\.lora_B(\.[^.]+)?\.bias$", key):
        return "a LoRA B bias (lora_bias) is not supported (yet)"
    return "it is not a LoRA A/B weight (trained base-model weights such as modules_to_save are not supported (yet))"


def hash_adapter(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex of an adapter's output-relevant content.

    ``config`` is the canonical config (JSON-serialisable; keys sorted here) and ``tensors`` maps
    canonical tensor names to the tensors as stored on disk. Each tensor contributes its name,
    dtype, shape and raw bytes, in name order; dtype and shape fix the byte length, so the stream
    is unambiguous. The same content always hashes equal; any change of a byte, rank, alpha or
    target changes it.
    """
    h = hashlib.sha256()
    h.update(b"loraserve-adapter-v1\0")
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        # A uint8 view gives the raw bytes for every dtype, bfloat16 included (numpy has none).
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def load_adapter(
    path: str | os.PathLike[str], spec: LoRAModelSpec, max_rank: int, name: str | None = None
) -> LoRAWeights:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``adapter_model.bin``).

    ``name`` defaults to the directory name. Tensors are converted to float32. Raises
    :class:`AdapterError` (and nothing else) when the adapter is unreadable, uses a feature the
    engine does not implement, does not fit ``spec`` or has a rank above ``max_rank``.
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

    tensors = _read_tensors(resolved, where)
    modules, canonical_tensors = _build_modules(tensors, config, spec, max_rank, where)

    weights = LoRAWeights(
        name=adapter_name,
        path=str(resolved),
        rank=max(w.rank for w in modules.values()),
        modules=MappingProxyType(modules),
        content_hash=hash_adapter(config.canonical(), canonical_tensors),
    )
    logger.info(
        "loaded adapter %r from %s: %d modules (%s), rank %d, %.2f MiB",
        adapter_name,
        resolved,
        len(modules),
        ",".join(sorted(weights.target_modules)),
        weights.rank,
        weights.nbytes / 2**20,
    )
    return weights


def _build_modules(
    tensors: Mapping[str, torch.Tensor], config: _Config, spec: LoRAModelSpec, max_rank: int, where: str
) -> tuple[dict[tuple[int, str], LoRAModuleWeights], dict[str, torch.Tensor]]:
    """Pair A and B per module, validate them against ``config`` and ``spec``, convert to float32.

    Also returns the on-disk tensors under canonical names (``layers.N.<parent>.<module>.lora_A``),
    so that the naming variants peft has used over time hash equal.
    """
    # (layer, module) -> {"A"|"B": (key, tensor)}; plus the module path peft matches the config on.
    pairs: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    module_keys: dict[tuple[int, str], str] = {}
    for key in sorted(tensors):
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
        short = f"layers.{layer}.{_PARENT[module]}.{module}"
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
            raise AdapterError(f"{where}: tensors {slot[ab][0]!r} and {key!r} are both lora_{ab} of {short}")
        slot[ab] = (key, tensors[key])
        module_keys[(layer, module)] = module_path

    if not pairs:
        raise AdapterError(f"{where}: the weights file holds no LoRA tensors (lora_A/lora_B)")

    modules: dict[tuple[int, str], LoRAModuleWeights] = {}
    canonical: dict[str, torch.Tensor] = {}
    # Model order (layer, then LORA_MODULES order) so that messages name the first offender.
    for (layer, module), slot in sorted(
        pairs.items(), key=lambda item: (item[0][0], LORA_MODULES.index(item[0][1]))
    ):
        short = f"layers.{layer}.{_PARENT[module]}.{module}"
        missing = [f"lora_{ab}" for ab in ("A", "B") if ab not in slot]
        if missing:
            raise AdapterError(f"{where}: {short} has no {missing[0]} tensor; the weights file is incomplete")
        (a_key, a), (b_key, b) = slot["A"], slot["B"]
        for key, t in ((a_key, a), (b_key, b)):
            if t.dtype not in _SUPPORTED_DTYPES:
                raise AdapterError(
                    f"{where}: tensor {key!r} has dtype {t.dtype}; only float32, float16, bfloat16 "
                    "(and float64) weights are supported"
                )
            if t.dim() != 2:
                raise AdapterError(
                    f"{where}: tensor {key!r} has shape {list(t.shape)}; LoRA weights are matrices"
                )
        in_features, out_features = spec.shapes[module]
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise AdapterError(
                f"{where}: A/B rank mismatch in {short}: lora_A is {list(a.shape)} (rank {rank}) but "
                f"lora_B is {list(b.shape)} (rank {b.shape[1]})"
            )
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise AdapterError(
                f"{where}: {short} maps {a.shape[1]} -> {b.shape[0]} features but the base model's "
                f"{module} maps {in_features} -> {out_features}; the adapter was trained for a different model"
            )
        config_rank, alpha = config.rank_and_alpha(module_keys[(layer, module)])
        if config_rank != rank:
            raise AdapterError(
                f"{where}: {short} has rank {rank} in the weights but adapter_config.json gives "
                f"r={config_rank} (from r/rank_pattern); config and weights disagree"
            )
        a32 = a.to(torch.float32).contiguous()
        b32 = b.to(torch.float32).contiguous()
        for key, t in ((a_key, a32), (b_key, b32)):
            if not bool(torch.isfinite(t).all()):
                raise AdapterError(
                    f"{where}: tensor {key!r} contains NaN or Inf (or overflows float32); the adapter is broken"
                )
        modules[(layer, module)] = LoRAModuleWeights(a=a32, b=b32, scale=config.scale(rank, alpha))
        canonical[f"{short}.lora_A"] = a
        canonical[f"{short}.lora_B"] = b

    # Checked over all modules so that the message gives the rank the engine actually needs.
    (layer, module), top = max(modules.items(), key=lambda item: item[1].rank)
    if top.rank > max_rank:
        raise AdapterError(
            f"{where}: rank {top.rank} of layers.{layer}.{_PARENT[module]}.{module} exceeds "
            f"max_lora_rank={max_rank}; start the engine with a larger max_lora_rank"
        )
    return modules, canonical


def _describe(value: Any) -> str:
    """Config values in messages: sets sorted so that messages are stable."""
    return repr(sorted(value)) if isinstance(value, frozenset) else repr(value)
