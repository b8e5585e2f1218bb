"""loraserve: serve one base model with many LoRA adapters mixed in every batch."""

from loraserve.core import CompletionOutput, LoRARequest, RequestOutput
from loraserve.llm import LLM
from loraserve.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "LoRARequest", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
