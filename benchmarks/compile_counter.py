"""Counts Triton kernel compilations, so that benchmarks can show any that fell inside a timed run."""

from __future__ import annotations

from collections import Counter

try:
    import triton
except ImportError:  # CPU-only environments without Triton: nothing compiles
    triton = None


class CompileCounter:
    """Counts Triton kernel compilations, by kernel name: one inside a timed run stalls a step for
    about a second, so the benchmarks report them (``None`` where Triton has no compile hook)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        knobs = getattr(triton, "knobs", None) if triton is not None else None
        self.enabled = knobs is not None and hasattr(knobs.runtime, "jit_post_compile_hook")
        if self.enabled:
            knobs.runtime.jit_post_compile_hook = self._hook

    def _hook(self, *, fn, **_: object) -> bool:
        self.names.append(getattr(fn, "name", str(fn)))
        return False

    def mark(self) -> int:
        return len(self.names)

    def since(self, mark: int) -> dict[str, int] | None:
        """Compilations since ``mark``, per kernel name."""
        if not self.enabled:
            return None
        return dict(Counter(self.names[mark:]))


COMPILES = CompileCounter()
