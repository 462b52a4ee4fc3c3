"""Tiny randomly initialised models and a tokenizer trained in-process, for offline tests."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tokenmill.config import ModelConfig
from tokenmill.model.tokenizer import Tokenizer

VOCAB = 384
EOS_ID = 1

# The prompts greedy outputs are compared on (against transformers on CPU, CPU against CUDA):
# short, one and two blocks of 8 and one token past, long enough to be chunked.
REFERENCE_PROMPT_LENS = (3, 16, 17, 40, 75)
REFERENCE_MAX_TOKENS = 24


def reference_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB) for _ in range(n)] for n in REFERENCE_PROMPT_LENS]

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "Continuous batching admits new requests at every step.",
    "def add(a, b):\n    return a + b\n",
    "1234567890 + 42 = 1234567932",
    "héllo wörld, ça va? 日本語のテキスト 🙂",
] * 20

ARCH = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"]),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"]),
}


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Tokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT, trainer)
    return Tokenizer(tok, bos_token_id=0, eos_token_ids=[EOS_ID])


@dataclass
class Loaded:
    config: ModelConfig
    weights: dict
    tokenizer: Tokenizer
    source: str = "tiny"


def tiny_hf_model(arch: str = "llama", seed: int = 0, **overrides):
    import transformers

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=arch != "llama",
        bos_token_id=0,
        eos_token_id=EOS_ID,
    )
    if arch == "qwen3":
        kwargs["head_dim"] = 32
    kwargs.update(overrides)
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[arch]
    torch.manual_seed(seed)
    config = cls(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    # Random init gives near-uniform logits where greedy ties are likely; scale up so the
    # argmax is decisive and the comparison tests the math, not rounding.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0 if "embed" in name or "lm_head" in name else 1.5)
    return model.eval()


def loaded_from_hf(model) -> Loaded:
    cfg = ModelConfig.from_hf(model.config.to_dict())
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return Loaded(cfg, weights, tiny_tokenizer())


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids):].tolist()
