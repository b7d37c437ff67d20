"""A tiny random CLIP text model in Hugging Face layout, as openai/clip-vit-large-patch14's
folder would hold it: hidden 32, 2 layers, 4 heads, 77 positions, and a tiny byte-level BPE
tokenizer (the 256 byte symbols, their `</w>` forms, a few whole-word merges and the two special
tokens)."""

import json
import os

import torch
import transformers

WORDS = ["a", "photo", "of", "cat", "dog", "the", "on", "table"]
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)


def byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes stand for themselves, the rest for
    code points from 256 on, so that every byte is one visible symbol."""
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def write_tokenizer(directory) -> transformers.CLIPTokenizer:
    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    merges = []
    for word in WORDS:  # left-to-right merges spelling each word as one `word</w>` token
        current = word[0]
        for i, ch in enumerate(word[1:], 1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merge = f"{current} {right}"
            current += right
            if merge not in merges:
                merges.append(merge)
                vocab.setdefault(current, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
    tokenizer.save_pretrained(directory)  # adds tokenizer.json / tokenizer_config.json
    return tokenizer


def text_config(tokenizer, **kw) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TINY, **kw},
    )


def write_tiny_clip(directory, seed: int = 0):
    """Writes the tokenizer and a random CLIPTextModel to `directory`; (tokenizer, model)."""
    tokenizer = write_tokenizer(directory)
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(text_config(tokenizer)).eval()
    model.save_pretrained(directory)
    return tokenizer, model
