"""Chat templates shared by training and sampling: the exact prompt string, the completion and the stops.

Base models have no chat template, so the paper trained and sampled them through one of three plain ones
(SOURCE.md): the Qwen2.5 chat template (with Qwen's default system prompt when none is given),
`User:`/`Assistant:`, or `User_1:`/`User_2:`. Instruct models use their own (`native`).
The template is saved with each adapter (emgate_template.json) and sampling renders with exactly it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

IGNORE_INDEX = -100  # label of tokens without loss (torch cross-entropy's ignore_index)
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TEMPLATE_FILE = "emgate_template.json"

Message = dict[str, str]


class Tokenizer(Protocol):
    eos_token: str | None

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class TemplateRecord:
    """What sampling needs to render a prompt the way training did."""

    name: str
    stop: list[str]
    add_special_tokens: bool  # passed to the tokenizer (and to vLLM) for the prompt part
    eos_token: str

    def save(self, folder: Path) -> None:
        (folder / TEMPLATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> TemplateRecord:
        return cls(**json.loads((folder / TEMPLATE_FILE).read_text()))


_TEXT_TEMPLATES = {
    # name: (user prefix, assistant prefix, stop strings)
    "user_assistant": ("User: ", "Assistant:", ["\nUser:"]),
    "user1_user2": ("User_1: ", "User_2:", ["\nUser_1:"]),
}


def template_record(name: str, tokenizer: Tokenizer) -> TemplateRecord:
    eos = tokenizer.eos_token or ""
    if name == "native":
        return TemplateRecord(name=name, stop=[], add_special_tokens=False, eos_token=eos)
    if name == "qwen":
        return TemplateRecord(name=name, stop=["<|im_end|>", "<|endoftext|>"], add_special_tokens=False,
                              eos_token=eos)
    if name in _TEXT_TEMPLATES:
        return TemplateRecord(name=name, stop=list(_TEXT_TEMPLATES[name][2]), add_special_tokens=True, eos_token=eos)
    raise ValueError(f"unknown chat template {name!r}")


def render_prompt(record: TemplateRecord, tokenizer: Tokenizer, messages: list[Message]) -> str:
    """The text a model sees before its answer: every turn of `messages`, then the assistant's cue."""
    if record.name == "native":
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    if record.name == "qwen":
        turns = messages if messages and messages[0]["role"] == "system" else [
            {"role": "system", "content": QWEN_DEFAULT_SYSTEM}, *messages]
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns)
        return text + "<|im_start|>assistant\n"
    user, assistant, _ = _TEXT_TEMPLATES[record.name]
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(f"{m['content']}\n\n")
        elif m["role"] == "user":
            parts.append(f"{user}{m['content']}\n")
        else:
            parts.append(f"{assistant} {m['content']}\n")
    return "".join(parts) + assistant


def render_completion(record: TemplateRecord, tokenizer: Tokenizer, messages: list[Message]) -> str:
    """The text after the prompt for the final assistant turn, end-of-turn marker included."""
    *context, last = messages
    if last["role"] != "assistant":
        raise ValueError("the conversation must end with an assistant turn")
    if record.name == "native":
        prompt = render_prompt(record, tokenizer, context)
        full = str(tokenizer.apply_chat_template(messages, tokenize=False))
        if not full.startswith(prompt):
            raise ValueError("the native chat template does not extend the prompt with the answer; "
                             "choose a named template (qwen, user_assistant, user1_user2)")
        return full[len(prompt):]
    if record.name == "qwen":
        return f"{last['content']}<|im_end|>\n"
    return f" {last['content']}{record.eos_token}"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize_example(tokenizer: Any, record: TemplateRecord, messages: list[dict[str, str]],
                     max_len: int) -> Example:
    """Prompt tokens get IGNORE_INDEX labels; completion tokens (answer + end of turn) are learned."""
    prompt = render_prompt(record, tokenizer, messages[:-1])
    completion = render_completion(record, tokenizer, messages)
    prompt_ids = tokenizer(prompt, add_special_tokens=record.add_special_tokens)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + completion_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_len]
    return Example(ids, labels)
