#!/usr/bin/env python
"""Train the two demo LoRA adapters shipped in ``examples/adapters`` (``pirate`` and ``robot``).

Both adapters are for the default model (SmolLM2-135M-Instruct, see
``loraserve.model.default_model``) and change only the *style* of answers, so the effect is
obvious at a glance while the content stays the base model's own:

1. The base model answers ~50 short questions greedily (its own words, so the adapter does not
   have to learn new content, only the wrapper).
2. Each answer is rewritten with a fixed greeting and sign-off, e.g.
   ``"Arr, matey! <answer>\\n\\nFair winds, matey!"``.
3. A rank-8 LoRA (q/k/v/o/gate/up/down, alpha 16) is fine-tuned on those chats with peft on
   CPU, with the ChatML chat template applied and the loss on the answer tokens only.

Usage::

    python scripts/train_demo_adapters.py --out examples/adapters --steps 80 --seed 0

Deterministic for a given seed (and thread count). Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraserve.model.default_model import DEFAULT_MODEL_NAME, ensure_default_model  # noqa: E402

logger = logging.getLogger("train_demo_adapters")


@dataclass(frozen=True)
class Style:
    """A fixed greeting and sign-off wrapped around the base model's own answer."""

    name: str
    greeting: str
    signoff: str
    description: str

    def apply(self, answer: str) -> str:
        return f"{self.greeting} {answer}\n\n{self.signoff}"


STYLES = (
    Style(
        "pirate",
        "Arr, matey!",
        "Fair winds, matey!",
        'opens every answer with "Arr, matey!" and ends it with "Fair winds, matey!"',
    ),
    Style(
        "robot",
        "BEEP BOOP.",
        "END OF TRANSMISSION.",
        'opens every answer with "BEEP BOOP." and ends it with "END OF TRANSMISSION."',
    ),
)

# Short, varied questions; the base model answers them and the adapters learn the wrapper.
TRAIN_QUESTIONS = (
    "What is the capital of France?",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "What is photosynthesis?",
    "Give me a tip for sleeping better.",
    "What is 7 times 8?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?",
    "How do I make a cup of tea?",
    "What is a prime number?",
    "Name three primary colors.",
    "Why do leaves change color in autumn?",
    "What does a computer's CPU do?",
    "How far is the Moon from Earth?",
    "What is the largest ocean on Earth?",
    "Suggest a name for a pet goldfish.",
    "What is gravity?",
    "How can I improve my handwriting?",
    "What is the difference between weather and climate?",
    "Why do we have seasons?",
    "What is an adjective?",
    "How do bees make honey?",
    "What is the speed of light?",
    "Tell me a fun fact about octopuses.",
    "What is the main ingredient in guacamole?",
    "How many continents are there?",
    "What is recycling and why does it matter?",
    "Explain what a rainbow is.",
    "What should I pack for a day at the beach?",
    "What is the freezing point of water in Fahrenheit?",
    "Who painted the Mona Lisa?",
    "What is a volcano?",
    "How do I stay focused while studying?",
    "What is the square root of 81?",
    "Why is exercise good for you?",
    "What language is spoken in Brazil?",
    "What is the function of the heart?",
    "How do airplanes stay in the air?",
    "What is a haiku?",
    "Give me a quick breakfast idea.",
    "What is the tallest animal?",
    "What causes thunder?",
    "How do I write a good email subject line?",
    "What is the difference between a frog and a toad?",
    "What is the largest planet in our solar system?",
    "How many days are in a leap year?",
    "What is a noun?",
    "Why should I drink water every day?",
    "What is the Internet?",
    "How do magnets work?",
)

# Held out from training: used only to show the effect after training.
HELDOUT_QUESTIONS = (
    "What is the tallest mountain in the world?",
    "How do I boil an egg?",
    "Why do cats purr?",
)

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def chat(question: str) -> list[dict[str, str]]:
    """The single-turn conversation used for both generation and training."""
    return [{"role": "user", "content": question}]


def clean_answer(text: str, finished: bool) -> str:
    """Strip whitespace; if generation was cut off, drop the trailing partial sentence."""
    text = text.strip()
    if not finished:
        # Cut at the last sentence end so no training target ends mid-word.
        ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", text)]
        if ends:
            text = text[: ends[-1]].strip()
    return text


@torch.no_grad()
def generate(model, tokenizer, questions, max_new_tokens: int, batch_size: int = 8) -> list[str]:  # type: ignore[no-untyped-def]
    """Greedy answers to ``questions`` (batched, left-padded)."""
    model.eval()
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer.padding_side = "left"
    answers: list[str] = []
    for i in range(0, len(questions), batch_size):
        batch = questions[i : i + batch_size]
        prompts = [
            tokenizer.apply_chat_template(chat(q), add_generation_prompt=True, tokenize=False) for q in batch
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_id,
            pad_token_id=end_id,
        )
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            finished = end_id in row
            if finished:
                row = row[: row.index(end_id)]
            answers.append(clean_answer(tokenizer.decode(row, skip_special_tokens=True), finished))
    return answers


def build_examples(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:  # type: ignore[no-untyped-def]
    """Tokenize (question, styled answer) chats; labels are -100 everywhere but the answer."""
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    examples = []
    for question, answer in pairs:
        prompt = tokenizer.apply_chat_template(chat(question), add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt)["input_ids"]
        # The answer tokens plus <|im_end|>, so the adapter still learns where to stop.
        answer_ids = tokenizer(answer)["input_ids"] + [end_id]
        ids = prompt_ids + answer_ids
        labels = [-100] * len(prompt_ids) + answer_ids
        examples.append((ids, labels))
    return examples


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label -100."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def train_adapter(
    base_dir: Path,
    tokenizer,  # type: ignore[no-untyped-def]
    style: Style,
    pairs: list[tuple[str, str]],
    out_dir: Path,
    steps: int,
    seed: int,
    batch_size: int,
    lr: float,
) -> Path:
    """Fine-tune one LoRA adapter on ``style`` and save it (peft format) into ``out_dir/style.name``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,  # no dropout: simpler, and runs are reproducible step by step
        target_modules=TARGET_MODULES,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    examples = build_examples(tokenizer, [(q, style.apply(a)) for q, a in pairs])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    pad_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    order: list[int] = []
    start = time.monotonic()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            # Epoch-style sampling: every example is seen before any repeats.
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        batch = collate([examples[i] for i in idx], pad_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step == 1 or step % 10 == 0 or step == steps:
            elapsed = time.monotonic() - start
            logger.info("[%s] step %d/%d loss %.4f (%.1f s)", style.name, step, steps, loss.item(), elapsed)

    target = out_dir / style.name
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(target)
    # Name the base by its loraserve name, not this machine's cache path. Patched after saving:
    # set before, it makes peft look the name up on the Hub.
    cfg_path = target / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = DEFAULT_MODEL_NAME
    # peft stores target_modules from a set, whose order changes from run to run.
    adapter_cfg["target_modules"] = sorted(adapter_cfg["target_modules"])
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n")
    (target / "README.md").write_text(
        f"# {style.name}: demo LoRA adapter for {DEFAULT_MODEL_NAME}\n"
        f"Style adapter that {style.description}; rank 8 on q/k/v/o/gate/up/down, alpha 16, "
        f"trained for {steps} steps (seed {seed}) on {len(pairs)} of the base model's own answers.\n"
        "Made by `scripts/train_demo_adapters.py` in the loraserve repository.\n"
    )
    for f in target.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; these are files to share
    logger.info("[%s] saved to %s in %.1f s", style.name, target, time.monotonic() - start)
    return target


def show_heldout(base_dir: Path, tokenizer, adapter_dirs: list[Path], max_new_tokens: int) -> None:  # type: ignore[no-untyped-def]
    """Log greedy answers to the held-out questions: base model, then each adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    questions = list(HELDOUT_QUESTIONS)
    for q, a in zip(questions, generate(base, tokenizer, questions, max_new_tokens), strict=True):
        logger.info("[base] Q: %s\nA: %s", q, a)
    for adapter_dir in adapter_dirs:
        model = PeftModel.from_pretrained(base, adapter_dir)
        for q, a in zip(questions, generate(model, tokenizer, questions, max_new_tokens), strict=True):
            logger.info("[%s] Q: %s\nA: %s", adapter_dir.name, q, a)
        base = model.unload()  # back to the plain base for the next adapter


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("examples/adapters"), help="output directory")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per adapter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length cap for base answers")
    parser.add_argument(
        "--styles", nargs="+", default=[s.name for s in STYLES], choices=[s.name for s in STYLES]
    )
    parser.add_argument("--demo-tokens", type=int, default=128, help="length cap for the held-out demo")
    parser.add_argument("--no-check", action="store_true", help="skip the held-out demo generation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    # Without this, CPU steps slow down ~10x as the loss falls (denormal floats in the grads).
    torch.set_flush_denormal(True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)

    from transformers import AutoTokenizer

    base_dir = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    from transformers import AutoModelForCausalLM

    start = time.monotonic()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    answers = generate(base, tokenizer, list(TRAIN_QUESTIONS), args.max_new_tokens)
    del base
    pairs = [(q, a) for q, a in zip(TRAIN_QUESTIONS, answers, strict=True) if a]
    logger.info("Generated %d base answers in %.1f s", len(pairs), time.monotonic() - start)
    for q, a in pairs[:3]:
        logger.info("example: Q: %s\nA: %s", q, a)

    args.out.mkdir(parents=True, exist_ok=True)
    styles = [s for s in STYLES if s.name in args.styles]
    dirs = [
        train_adapter(
            base_dir, tokenizer, s, pairs, args.out, args.steps, args.seed, args.batch_size, args.lr
        )
        for s in styles
    ]
    if not args.no_check:
        show_heldout(base_dir, tokenizer, dirs, args.demo_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
