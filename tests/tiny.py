"""Tiny random Hugging Face models and a tokenizer, built in code (no hub access in tests)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sae_train.data import DataConfig, TextConfig
from sae_train.data.sources import stdlib_root
from sae_train.lm import ModelConfig
from sae_train.sae import SAEConfig
from sae_train.train import TrainConfig

SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>"]
VOCAB = 384
WORDS = "alpha beta gamma delta import def return class self value None True print list dict".split()


def tiny_tokenizer() -> T.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few stdlib files: deterministic and offline."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [(stdlib_root() / name).read_text() for name in ("textwrap.py", "colorsys.py", "bisect.py")]
    tok.train_from_iterator(corpus, trainer=trainer)
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL[0], eos_token=SPECIAL[1], pad_token=SPECIAL[2]
    )


def _common(tokenizer: T.PreTrainedTokenizerFast) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tiny_config(family: str, tokenizer: T.PreTrainedTokenizerFast, n_layers: int = 3) -> T.PretrainedConfig:
    ids = _common(tokenizer)
    llama_like = dict(
        num_hidden_layers=n_layers,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **ids,
    )
    if family == "gpt2":
        return T.GPT2Config(n_layer=n_layers, n_embd=32, n_head=4, n_positions=128, **ids)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(
            num_hidden_layers=n_layers,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            **ids,
        )
    if family == "llama":
        return T.LlamaConfig(**llama_like)
    if family == "mistral":
        return T.MistralConfig(**llama_like)
    if family == "qwen2":
        return T.Qwen2Config(**llama_like)
    if family == "gemma":
        return T.GemmaConfig(head_dim=8, **llama_like)
    if family == "gemma2":
        return T.Gemma2Config(head_dim=8, sliding_window=16, **llama_like)
    raise ValueError(family)


FAMILIES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2"]


def save_tiny_model(directory: Path, family: str, tokenizer: T.PreTrainedTokenizerFast, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(family, tokenizer))
    # Random init of some families leaves norms at exactly 1/0 and tiny weights; perturb every
    # parameter so sites carry distinguishable, non-degenerate values.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_corpus(directory: Path, n_files: int = 30, n_words: int = 120, seed: int = 0) -> Path:
    """n_files text files of pseudo-code words: local text for `data.source=files`."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n_files):
        (directory / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(n_words)))
    return directory


def live_train_cfg(
    model_dir: Path, corpus: Path, out_dir: Path, sites: list[str], sae: SAEConfig, **fields
) -> TrainConfig:
    """A live training run of the tiny model in model_dir over a write_corpus directory: windows
    of 32 tokens, batches of 256, fp32, quiet; `fields` override the rest of TrainConfig."""
    defaults = {"n_tokens": 2048, "batch_size": 256, "live_buffer_tokens": 1024, "dtype": "float32", "progress": False}
    return TrainConfig(
        source="live",
        model=ModelConfig(name=str(model_dir), dtype="float32", device="cpu"),
        data=DataConfig(source="files", path=str(corpus)),
        text=TextConfig(context_size=32),
        sites=sites,
        out_dir=str(out_dir),
        sae=sae,
        **(defaults | fields),
    )
