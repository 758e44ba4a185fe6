"""Prompts for LLM text encoders that read them as a chat turn (Z-Image, FLUX.2 [klein]: Qwen3), without jinja.

diffusers' pipelines call `tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
add_generation_prompt=True, enable_thinking=...)` and tokenize the text. For one user turn Qwen's ChatML template
renders fixed text around the prompt, which this module writes in code: `<|im_start|>user\\n{prompt}<|im_end|>\\n
<|im_start|>assistant\\n`, and with thinking off the empty thinking block Qwen3's template adds. What is read from
the model's files: the template itself (chat_template.jinja or tokenizer_config.json's `chat_template`), which must
be ChatML (its turn markers present, and tokens of the tokenizer), and whether it has that thinking branch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .echo import echo
from .files import inside, read_text
from .manifest import ManifestError, read_json
from .sequence_tokenizer import SequenceTokenizer, sequence_tokenizer_for

TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
EMPTY_THINKING = "<think>\n\n</think>\n\n"  # Qwen3's template with enable_thinking=False
MAX_TEMPLATE_BYTES = 1 << 20


class ChatTemplate:
    """A tokenizer folder's ChatML template, rendered for one user turn and the assistant's generation prompt."""

    def __init__(self, folder: Path, tokenizer: SequenceTokenizer) -> None:
        folder = Path(folder)
        text = read_template(folder)
        if TURN_START not in text or TURN_END not in text or "assistant" not in text:
            raise ManifestError(
                f"{folder}: the chat template is not Qwen's ChatML ({TURN_START} ... {TURN_END} turns), the only one "
                "this runtime renders"
            )
        for marker in (TURN_START, TURN_END):
            if tokenizer.tokenizer.token_to_id(marker) is None:
                raise ManifestError(f"{folder}: the tokenizer has no {echo(marker)} token for its chat template")
        escaped = EMPTY_THINKING.replace("\n", "\\n")
        self.thinking_switch = "enable_thinking" in text and (EMPTY_THINKING in text or escaped in text)

    def render(self, prompt: str, enable_thinking: bool) -> str:
        """What apply_chat_template renders for one user message with add_generation_prompt=True."""
        text = f"{TURN_START}user\n{prompt}{TURN_END}\n{TURN_START}assistant\n"
        return text + (EMPTY_THINKING if self.thinking_switch and not enable_thinking else "")


def read_template(folder: Path) -> str:
    """The chat template's jinja text: chat_template.jinja, else tokenizer_config.json's `chat_template` (a
    string, or the entry named "default" of a list); ManifestError when there is none."""
    if os.path.lexists(folder / "chat_template.jinja"):
        return read_text(inside(folder, "chat_template.jinja", folder), MAX_TEMPLATE_BYTES, "chat template")
    config = read_json(folder / "tokenizer_config.json") if os.path.lexists(folder / "tokenizer_config.json") else {}
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise ManifestError(f"{folder}: no chat template (chat_template.jinja or tokenizer_config.json)")
    return template


class ChatPrompts:
    """Prompts -> ids and attention mask of their chat turns, as the pipeline tokenizes them: cut to `max_length`
    tokens; padded (right) to `max_length`, or with `pad_to_longest` to the batch's longest (for a pipeline that
    keeps each prompt's valid tokens only, as Z-Image does: a causal encoder's states of those tokens do not
    depend on the padding after them)."""

    def __init__(
        self, folder: Path, name: str, encoder: str, max_length: int, enable_thinking: bool, pad_to_longest: bool
    ) -> None:
        self.sequence = sequence_tokenizer_for(folder, name, encoder, max_length, pad_to_longest)
        inside(folder, f"{name}/chat_template.jinja", folder)
        self.template = ChatTemplate(Path(folder) / name, self.sequence)
        self.enable_thinking = enable_thinking
        self.max_length = max_length
        self.tokenizer = self.sequence.tokenizer

    def texts(self, prompts: list[str]) -> list[str]:
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        return [self.template.render(prompt, self.enable_thinking) for prompt in prompts]

    def encode(self, prompts: list[str], max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """int32 ids and attention mask of the prompts' chat turns (cut to `max_length`, else the model's)."""
        return self.sequence.with_length(max_length).encode(self.texts(prompts))

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return self.encode(prompts)[0]

    def add_embeddings(self, embeddings: list, rows: int) -> None:
        if embeddings:
            raise ValueError("textual-inversion embeddings are for CLIP text encoders, not LLM ones")
