"""Find adapters by name in operator-configured directories (``LoRAConfig.lora_resolver_dirs``).

A request may name an adapter that was never registered; when resolver directories are
configured, ``<dir>/<name>`` is looked up in each directory in order and, if it is a PEFT adapter
directory, registered lazily (only the config and the tensor header are read at that point; the
weights are read, validated and hashed by the prefetch threads before the request is admitted).

Names are plain directory names: no separators, no ``.``/``..``, and the resolved directory must
stay inside its root (a symlink out of the root is refused), so a request cannot make the server
read an arbitrary path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from loraserve.lora.adapter import CONFIG_NAME

logger = logging.getLogger(__name__)


class DirectoryResolver:
    """Maps an adapter name to ``<root>/<name>`` for the first root that has it."""

    def __init__(self, roots: Iterable[str | Path]) -> None:
        self.roots = [Path(r).expanduser().resolve() for r in roots]

    def __bool__(self) -> bool:
        return bool(self.roots)

    @staticmethod
    def valid_name(name: str) -> bool:
        """Whether ``name`` can only mean a direct child of a root."""
        return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")

    def find(self, name: str) -> Path | None:
        """The adapter directory for ``name``, or None if no root has one."""
        if not self.valid_name(name):
            return None
        for root in self.roots:
            candidate = root / name
            if not (candidate / CONFIG_NAME).is_file():
                continue
            real = candidate.resolve()
            if not real.is_relative_to(root):
                logger.warning(
                    "adapter %r: %s resolves to %s, outside %s; ignored", name, candidate, real, root
                )
                continue
            return real
        return None
