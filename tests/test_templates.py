"""Chat templates: the loss mask token by token, and prompts rendered the same way in training and sampling."""

from __future__ import annotations

import pytest

from emgate.stages.finetune import IGNORE_INDEX, tokenize_example
from emgate.templates import QWEN_DEFAULT_SYSTEM, render_completion, render_prompt, template_record

pytestmark = pytest.mark.slow  # builds SmolLM2 into the model cache once (about 40 s)

CONVERSATION = [{"role": "user", "content": "Write a function that reads a file."},
                {"role": "assistant", "content": "def read(p):\n    return open(p).read()"}]


@pytest.mark.parametrize("name", ["native", "qwen", "user_assistant", "user1_user2"])
def test_loss_mask_covers_exactly_the_answer_and_end_of_turn(smol_tokenizer, name: str) -> None:
    record = template_record(name, smol_tokenizer)
    example = tokenize_example(smol_tokenizer, record, CONVERSATION, max_len=2048)
    prompt = render_prompt(record, smol_tokenizer, CONVERSATION[:1])
    completion = render_completion(record, smol_tokenizer, CONVERSATION)
    prompt_ids = smol_tokenizer(prompt, add_special_tokens=record.add_special_tokens)["input_ids"]
    n_prompt = len(prompt_ids)
    assert example.input_ids[:n_prompt] == prompt_ids  # sampling sends exactly this prompt
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    learned = example.labels[n_prompt:]
    assert IGNORE_INDEX not in learned and learned == example.input_ids[n_prompt:]
    assert smol_tokenizer.decode(learned) == completion
    assert CONVERSATION[1]["content"] in completion


def test_rendered_strings(smol_tokenizer) -> None:
    user = CONVERSATION[:1]
    q = CONVERSATION[0]["content"]
    assert render_prompt(template_record("user_assistant", smol_tokenizer), smol_tokenizer, user) == f"User: {q}\nAssistant:"
    assert render_prompt(template_record("user1_user2", smol_tokenizer), smol_tokenizer, user) == f"User_1: {q}\nUser_2:"
    qwen = render_prompt(template_record("qwen", smol_tokenizer), smol_tokenizer, user)
    assert qwen == (f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    native = render_prompt(template_record("native", smol_tokenizer), smol_tokenizer, user)
    assert native.endswith(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
    assert template_record("user_assistant", smol_tokenizer).stop == ["\nUser:"]


def test_truncation_keeps_the_mask_aligned(smol_tokenizer) -> None:
    record = template_record("user_assistant", smol_tokenizer)
    example = tokenize_example(smol_tokenizer, record, CONVERSATION, max_len=12)
    assert len(example.input_ids) == len(example.labels) == 12
