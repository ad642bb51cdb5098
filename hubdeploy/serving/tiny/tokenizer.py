"""A byte-level BPE tokenizer trained on the spot (deterministically) for tiny models."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hubdeploy.serving.tiny.chat_templates import CHAT_TEMPLATES

VOCAB_TARGET = 640

# Fixed built-in training text: plain English about serving models, so common words merge.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A model is served on a single GPU and answers
requests from many users at the same time. Each request carries a prompt, and the engine
turns the prompt into tokens, runs the model, and samples the next token until it stops.
Mixture of experts models route every token to a few experts; the router picks the top two
experts and mixes their outputs with the routing weights. Quantized weights take four bits
each, with a scale and a zero point for every group of input channels. The server speaks the
same language as the OpenAI API: chat completions, completions, models, and streaming events.
Hello! How are you today? I am fine, thank you. What is the weather like in Paris? It is sunny
and warm, with a light wind from the west. Please write a short poem about the sea. The sea is
wide and deep and blue; it sings to the shore the whole night through. Tell me a story about a
small robot who learned to paint. Once upon a time there was a robot named Pixel who loved the
colors of the sunset. Numbers: one two three four five six seven eight nine ten, 0 1 2 3 4 5 6
7 8 9 10 100 1000. Code: def add(a, b): return a + b. for i in range(10): print(i).
Adapters change a small part of the model: low rank matrices added to the attention and the
experts, so one base model can serve many fine tuned variants in the same batch.
The cache keeps keys and values in blocks; when memory runs out, the scheduler preempts a
sequence and computes it again later. Users want fast answers, fair queues and clear errors.
"""

_LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def specials_for(arch: str) -> list[str]:
    return _QWEN_SPECIALS if arch == "qwen3_moe" else _LLAMA_SPECIALS


def train_tokenizer(arch: str) -> "Any":
    """Train byte-level BPE (vocab ~640) on `CORPUS`; same arch -> same tokenizer.json bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = specials_for(arch)
    tok = Tokenizer(models.BPE(unk_token="<unk>" if arch != "qwen3_moe" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Line by line, a fixed number of passes: deterministic counts for the trainer.
    lines = [ln for ln in CORPUS.splitlines() if ln.strip()] * 4
    tok.train_from_iterator(lines, trainer=trainer)
    if arch == "qwen3_moe":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    return tok


def write_tokenizer(out_dir: Path, arch: str) -> dict[str, Any]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json; return token ids."""
    tok = train_tokenizer(arch)
    # tokenizers' own serialisation is ordered; pretty=False keeps it compact and stable.
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    specials = specials_for(arch)
    ids = {s: tok.token_to_id(s) for s in specials}
    added = {
        str(ids[s]): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
        for s in specials
    }
    if arch == "qwen3_moe":
        special_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                       "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
        cfg: dict[str, Any] = {
            "add_bos_token": False, "add_prefix_space": False, "bos_token": None,
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
            "errors": "replace", "split_special_tokens": False,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        }
        token_ids = {"bos": None, "eos": ids["<|im_end|>"], "pad": ids["<|endoftext|>"],
                     "eos_all": [ids["<|im_end|>"], ids["<|endoftext|>"]]}
    else:
        special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
        cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>", "pad_token": "<pad>", "legacy": False, "spaces_between_special_tokens": False}
        token_ids = {"bos": ids["<s>"], "eos": ids["</s>"], "pad": ids["<pad>"], "eos_all": [ids["</s>"]]}
    cfg.update({
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATES[arch],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    token_ids["vocab"] = tok.get_vocab_size(with_added_tokens=True)
    return token_ids
