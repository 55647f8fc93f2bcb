"""Tiny random BERT-family HF folders (config.json, safetensors from `save_pretrained`, a trained tokenizer).

Tokenizers are trained in milliseconds with `tokenizers`, each in its family's style so that pairs encode
as they do on the hub: BERT a lower-casing WordPiece (`[CLS] a [SEP] b [SEP]`, token types 0/1), RoBERTa a
byte-level BPE and XLM-R a unigram model (`<s> a </s></s> b </s>`, pad id 1, so positions start at 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PreTrainedTokenizerFast

CORPUS = [
    "A man is eating food. A man is eating a piece of bread. A man is riding a horse.",
    "The capital of France is Paris; the capital of Italy is Rome, 0123456789.",
    "Tokenizers turn text into numbers and encoders turn numbers into vectors!",
    "Quick brown foxes jump over lazy dogs? é ü ñ",
] * 10

# architecture -> (model_type, tokenizer style)
ARCHITECTURES = {
    "BertModel": ("bert", "wordpiece"),
    "BertForSequenceClassification": ("bert", "wordpiece"),
    "RobertaModel": ("roberta", "bpe"),
    "RobertaForSequenceClassification": ("roberta", "bpe"),
    "XLMRobertaModel": ("xlm-roberta", "unigram"),
    "XLMRobertaForSequenceClassification": ("xlm-roberta", "unigram"),
}


def train_tokenizer(folder: Path, style: str, vocab_size: int = 200) -> PreTrainedTokenizerFast:
    """Train and save a small tokenizer of `style` ("wordpiece", "bpe" or "unigram")."""
    if style == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
        tok.train_from_iterator(CORPUS, trainer)
        cls, sep = ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[cls, sep]
        )
        names = {
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
            "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
        }
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        if style == "bpe":
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(  # vocab_size on top of the 256-byte alphabet
                vocab_size=vocab_size + 256,
                special_tokens=specials,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            )
        else:
            tok = Tokenizer(models.Unigram())
            tok.pre_tokenizer = pre_tokenizers.Metaspace()
            tok.decoder = decoders.Metaspace()
            trainer = trainers.UnigramTrainer(
                vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>"
            )
        tok.train_from_iterator(CORPUS, trainer)
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", 2), ("<s>", 0), add_prefix_space=style == "bpe"
        )
        names = {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "cls_token": "<s>",
            "sep_token": "</s>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "mask_token": "<mask>",
        }
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    hf.save_pretrained(folder)
    return hf


def build_encoder_folder(folder: Path, architecture: str, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random `architecture` model (biases and LayerNorms random too) to `folder`."""
    model_type, style = ARCHITECTURES[architecture]
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(folder, style)
    roberta = model_type != "bert"
    shape: dict[str, Any] = {
        "architectures": [architecture],
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 37,
        "hidden_act": "gelu",
        "max_position_embeddings": 64 + (2 if roberta else 0),
        "type_vocab_size": 1 if roberta else 2,
        "pad_token_id": tokenizer.pad_token_id,
        "layer_norm_eps": 1e-5 if roberta else 1e-12,
    }
    shape.update(overrides)
    config = AutoConfig.for_model(model_type, **shape)
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if architecture.endswith("Classification") else AutoModel
    model = auto.from_config(config)
    with torch.no_grad():  # the default init zeroes biases and sets norms to one: randomise everything
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
