"""A tiny random Whisper HF folder, laid out as the hub's openai/whisper-* checkpoints are.

`build_whisper` writes what `WhisperForConditionalGeneration.from_pretrained` and our loader read:
config.json and model.safetensors (transformers' `save_pretrained` of a tiny random model),
tokenizer files (transformers' `WhisperTokenizer` over a small byte-level BPE trained here, with
Whisper's special tokens in Whisper's order after the text tokens: `<|endoftext|>`,
`<|startoftranscript|>`, the languages, `<|translate|>`, `<|transcribe|>`, `<|startoflm|>`,
`<|startofprev|>`, `<|nocaptions|>`, `<|notimestamps|>`, then the 1501 timestamps `<|0.00|>` ..
`<|30.00|>`, added as the hub's tokenizers add them: not special), preprocessor_config.json
(`WhisperFeatureExtractor`'s settings) and generation_config.json (the hub's Whisper keys:
suppress lists, `no_timestamps_token_id`, `lang_to_id` / `task_to_id` for multilingual models,
`max_initial_timestamp_index`, ...).

The weights are drawn from N(0, `std`) (norms and biases too; see `EMBED_STD` and the other
scales below for the exceptions), so outputs depend on the audio and no layer is an identity;
the encoder's positions stay the sinusoids real checkpoints store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)
from transformers.models.whisper.modeling_whisper import sinusoids

# the first languages of Whisper's list, in its order (a real multilingual model has 99)
LANGUAGES = ("en", "zh", "de", "es", "ru", "ko", "fr", "ja")
TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>, 0.02 s apart
TEXT_VOCAB = 300  # byte-level BPE tokens before <|endoftext|>
SPECIALS_AFTER_LANGUAGES = (
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)
# Weight scales that keep a random model's greedy output from collapsing into one repeated token:
# small token embeddings (with tied ones, large embeddings make every token predict itself), sharp
# cross-attention (so the audio, not the average frame, moves the logits), a final layer norm that
# scales the logits up (to about +-5, as a trained model's spread) with no bias (a bias there would
# favour the same tokens whatever the input), and smaller timestamp embeddings (1501 of the ~1800
# tokens are timestamps: at full size they would win most steps even without timestamps asked for)
EMBED_STD, CROSS_SHARPNESS, LOGIT_SCALE, TIMESTAMP_SCALE = 0.02, 3.0, 20.0, 0.3
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, this is a test of speech.",
    "Whisper turns speech into text; timestamps mark where each segment starts and ends.",
    "One two three four five six seven eight nine ten, 0123456789, a b c d e f g ?!",
] * 20


def build_whisper(
    folder: Path, seed: int = 0, multilingual: bool = False, std: float = 0.5, **overrides: Any
) -> Path:
    """Write a tiny random Whisper model to `folder` and return the folder.

    `multilingual`: the tokenizer's language tokens are listed in generation_config.json's
    `lang_to_id` (with `task_to_id` and `is_multilingual`), as for openai/whisper-base; otherwise the
    model is English-only like whisper-tiny.en (the language tokens exist but are not offered).
    `overrides` go to `WhisperConfig` (e.g. `decoder_layers=3`), except `generation`, a dict merged
    into generation_config.json (e.g. `{"max_initial_timestamp_index": 3}`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    generation_overrides = overrides.pop("generation", {})
    tokenizer = whisper_tokenizer(folder)
    ids = special_ids(tokenizer)
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_layers=2,
        decoder_attention_heads=4,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=64,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
        **overrides,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    with torch.no_grad():  # the default init zeroes biases and sets norms to one: randomise everything
        for name, param in model.named_parameters():
            param.normal_(0.0, EMBED_STD if "embed_tokens" in name else std)
            if ".encoder_attn." in name and ("q_proj.weight" in name or "k_proj.weight" in name):
                param.mul_(CROSS_SHARPNESS)
        model.model.decoder.embed_tokens.weight[ids["<|0.00|>"] :] *= TIMESTAMP_SCALE
        final = model.model.decoder.layer_norm
        final.weight.mul_(LOGIT_SCALE)
        final.bias.zero_()
        positions = model.model.encoder.embed_positions.weight
        positions.copy_(sinusoids(*positions.shape))
    model.save_pretrained(folder, safe_serialization=True)  # its generation_config.json is replaced below
    (folder / "generation_config.json").write_text(
        json.dumps({**generation_config(tokenizer, config, multilingual), **generation_overrides}, indent=2)
    )
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(folder)
    return folder


def whisper_tokenizer(folder: Path) -> WhisperTokenizer:
    """A `WhisperTokenizer` over a small trained byte-level BPE plus Whisper's special tokens, saved to `folder`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = WhisperTokenizer(vocab=state["vocab"], merges=merges)
    specials = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *(f"<|{code}|>" for code in LANGUAGES),
        *SPECIALS_AFTER_LANGUAGES,
    ]
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True
    )
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(TIMESTAMPS)]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in stamps])
    tokenizer.save_pretrained(folder)
    return tokenizer


def special_ids(tokenizer: WhisperTokenizer) -> dict[str, int]:
    """Every special token's id (and `<|0.00|>`'s), by its string."""
    names = ["<|endoftext|>", "<|startoftranscript|>", *SPECIALS_AFTER_LANGUAGES, "<|0.00|>"]
    names += [f"<|{code}|>" for code in LANGUAGES]
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in names}
    assert ids["<|endoftext|>"] == TEXT_VOCAB, "the text tokens come first"
    assert ids["<|0.00|>"] == ids["<|notimestamps|>"] + 1 == len(tokenizer) - TIMESTAMPS
    return ids


def generation_config(
    tokenizer: WhisperTokenizer, config: WhisperConfig, multilingual: bool
) -> dict[str, Any]:
    """generation_config.json as the hub's Whisper checkpoints have it (bar alignment heads)."""
    ids = special_ids(tokenizer)
    eot = ids["<|endoftext|>"]
    # as openai's suppress list: some punctuation-like text tokens and the specials that never follow a prompt
    text = [tokenizer.convert_tokens_to_ids(t) for t in ("!", '"', "#", "(", ")", "*", "-")]
    specials = [ids[t] for t in ("<|startoftranscript|>", *SPECIALS_AFTER_LANGUAGES[:5])]
    data: dict[str, Any] = {
        "begin_suppress_tokens": [tokenizer.convert_tokens_to_ids("Ġ"), eot],
        "bos_token_id": eot,
        "decoder_start_token_id": ids["<|startoftranscript|>"],
        "eos_token_id": eot,
        "pad_token_id": eot,
        "is_multilingual": multilingual,
        "max_initial_timestamp_index": 50,
        "max_length": config.max_target_positions,
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "prev_sot_token_id": ids["<|startofprev|>"],
        "return_timestamps": False,
        "suppress_tokens": sorted(text) + specials,
    }
    if multilingual:
        data["lang_to_id"] = {f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES}
        data["task_to_id"] = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    return data
