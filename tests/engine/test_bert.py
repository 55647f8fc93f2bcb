"""Our BERT-family encoder against transformers, on tiny random models and on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from engine.loader import safetensors_weights
from engine.model_config import UnsupportedModelError
from engine.model_files import resolve_model
from engine.models.bert import BertForSequenceClassification, BertModel, EncoderConfig, build_encoder
from engine.pooling import PoolingConfig, classifier_activation, embedding_output, pool, read_pooling_config
from tests.engine.tiny_encoders import build_encoder_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LENGTHS = [1, 3, 17, 40]
PAIR = ("A man is eating food.", "The capital of France is Paris.")


def load_ours(folder: Path, dtype: torch.dtype = torch.float32) -> BertModel:
    config = EncoderConfig.from_hf(json.loads((folder / "config.json").read_text()))
    return build_encoder(
        config, dtype, torch.device("cpu"), safetensors_weights(folder, dtype, progress=False)
    )


def sequences(folder: Path, vocab_size: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, token_type_ids): random ids (no special or pad ids) of LENGTHS, and one tokenized pair."""
    gen = torch.Generator().manual_seed(1)
    out = [(torch.randint(5, vocab_size, (n,), generator=gen).tolist(), [0] * n) for n in LENGTHS]
    encoded = AutoTokenizer.from_pretrained(folder)(*PAIR)
    ids = encoded["input_ids"]
    out.append((ids, encoded.get("token_type_ids") or [0] * len(ids)))
    return out


def flat(
    seqs: list[tuple[list[int], list[int]]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    ids = torch.tensor([t for s, _ in seqs for t in s])
    types = torch.tensor([t for _, s in seqs for t in s])
    positions = torch.cat([torch.arange(len(s)) for s, _ in seqs])
    return ids, positions, types, [len(s) for s, _ in seqs]


def assert_close_relative(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    err = (ours - ref).abs().max().item() / ref.abs().max().item()
    assert err < rel, f"max error {err:.2e} of the largest value"


# ---- tiny random models against transformers ----

ENCODERS = {  # architecture -> overrides: an activation of each kind
    "BertModel": {"hidden_act": "gelu"},
    "RobertaModel": {"hidden_act": "gelu_new"},
    "XLMRobertaModel": {"hidden_act": "relu"},
}
CLASSIFIERS = {
    "bert-1": ("BertForSequenceClassification", {"num_labels": 1}),
    "bert-3": ("BertForSequenceClassification", {"num_labels": 3, "hidden_act": "gelu_pytorch_tanh"}),
    "xlmr-3": ("XLMRobertaForSequenceClassification", {"num_labels": 3}),
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("encoders")


@pytest.mark.parametrize("architecture", ENCODERS)
def test_hidden_states_match_transformers(models_dir: Path, architecture: str):
    folder = build_encoder_folder(models_dir / architecture, architecture, **ENCODERS[architecture])
    ref_model = AutoModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    seqs = sequences(folder, ref_model.config.vocab_size)
    with torch.no_grad():
        ref = torch.cat(
            [
                ref_model(
                    input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])
                ).last_hidden_state[0]
                for ids, types in seqs
            ]
        )
        ours = load_ours(folder)
        ids, positions, types, lens = flat(seqs)
        hidden = ours(ids, positions, types, lens)
    assert type(ours) is BertModel
    assert hidden.shape == ref.shape
    assert_close_relative(hidden, ref)
    # a sequence alone gives the rows it gets inside the batch (no padding or neighbour leaks in)
    a, b = lens[0], lens[0] + lens[1]
    assert_close_relative(ours(ids[a:b], positions[a:b], None, [b - a]), hidden[a:b])
    with pytest.raises(ValueError, match="do not split"):
        ours(ids, positions, types, lens[:-1])
    long = torch.full((65,), 7)
    with pytest.raises(ValueError, match="65 tokens is longer than this model's 64"):
        ours(long, torch.arange(65), None, [65])


def test_attention_groups_keep_sequences_apart(models_dir: Path):
    """Sequences sorted into padded attention groups (an outlier, equal lengths, near lengths) give the rows
    each gets alone."""
    model = load_ours(build_encoder_folder(models_dir / "groups", "BertModel"))
    lens = [5, 64, 5, 30, 2, 5, 31, 1, 60]
    gen = torch.Generator().manual_seed(3)
    seqs = [(torch.randint(5, 100, (n,), generator=gen).tolist(), [n % 2] * n) for n in lens]
    ids, positions, types, lens = flat(seqs)
    batched = model(ids, positions, types, lens).split(lens)
    for (seq, kinds), rows in zip(seqs, batched, strict=True):
        alone = model(torch.tensor(seq), torch.arange(len(seq)), torch.tensor(kinds), [len(seq)])
        assert_close_relative(rows, alone)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classification_logits_match_transformers(models_dir: Path, name: str):
    architecture, overrides = CLASSIFIERS[name]
    folder = build_encoder_folder(models_dir / name, architecture, seed=2, **overrides)
    ref_model = AutoModelForSequenceClassification.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    ).eval()
    seqs = sequences(folder, ref_model.config.vocab_size)
    with torch.no_grad():
        ref = torch.cat(
            [
                ref_model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits
                for ids, types in seqs
            ]
        )
        ours = load_ours(folder)
        ids, positions, types, lens = flat(seqs)
        logits = ours.classify(ours(ids, positions, types, lens), lens)
    assert isinstance(ours, BertForSequenceClassification)
    assert logits.dtype == torch.float32 and logits.shape == (len(seqs), overrides["num_labels"])
    assert_close_relative(logits, ref)
    assert ours.config.id2label == {i: f"LABEL_{i}" for i in range(overrides["num_labels"])}


def test_packed_bfloat16_matches_unpacked(models_dir: Path):
    folder = build_encoder_folder(models_dir / "packed", "BertModel")
    model = load_ours(folder, torch.bfloat16)
    ids, positions, types, lens = flat(sequences(folder, model.config.vocab_size))
    plain = model(ids, positions, types, lens)
    model.pack_weights()
    torch.testing.assert_close(model(ids, positions, types, lens), plain, rtol=2e-2, atol=2e-2)


# ---- loading ----


def test_load_weights_takes_names_with_and_without_prefix_and_skips_foreign_heads(models_dir: Path):
    folder = build_encoder_folder(models_dir / "names", "BertModel")
    config = EncoderConfig.from_hf(json.loads((folder / "config.json").read_text()))
    weights = dict(safetensors_weights(folder, torch.float32, progress=False))
    assert "pooler.dense.weight" in weights and not any(n.startswith("bert.") for n in weights)
    prefixed = {f"bert.{n}": t for n, t in weights.items()}
    prefixed["bert.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)
    prefixed["cls.predictions.bias"] = torch.zeros(config.vocab_size)  # a masked-LM head rides along
    a = build_encoder(config, torch.float32, torch.device("cpu"), weights.items())
    b = build_encoder(config, torch.float32, torch.device("cpu"), prefixed.items())
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_load_weights_reports_missing_wrong_shaped_and_unknown_tensors(models_dir: Path):
    folder = build_encoder_folder(models_dir / "broken", "BertModel")
    config = EncoderConfig.from_hf(json.loads((folder / "config.json").read_text()))
    weights = dict(safetensors_weights(folder, torch.float32, progress=False))
    cpu = torch.device("cpu")

    lacking = {n: t for n, t in weights.items() if n != "encoder.layer.1.attention.self.key.weight"}
    with pytest.raises(ValueError, match=r"lacks tensors for BertModel: layers\.1\.qkv\.weight\[k\]"):
        build_encoder(config, torch.float32, cpu, lacking.items())
    wrong = {**weights, "encoder.layer.0.output.dense.bias": torch.zeros(7)}
    with pytest.raises(
        ValueError, match=r"'encoder\.layer\.0\.output\.dense\.bias' has shape \(7,\), expected \(32,\)"
    ):
        build_encoder(config, torch.float32, cpu, wrong.items())
    unknown = {**weights, "encoder.layer.0.attention.self.rotary.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="has no place in BertModel"):
        build_encoder(config, torch.float32, cpu, unknown.items())
    classifier = EncoderConfig.from_hf(
        {
            **json.loads((folder / "config.json").read_text()),
            "architectures": ["BertForSequenceClassification"],
        }
    )
    with pytest.raises(
        ValueError, match=r"lacks tensors for BertForSequenceClassification: head_dense\.bias"
    ):
        build_encoder(
            classifier, torch.float32, cpu, {n: t for n, t in weights.items() if "pooler" not in n}.items()
        )


def test_config_from_hf():
    base = {
        "vocab_size": 100,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 514,
        "pad_token_id": 1,
    }
    xlmr = EncoderConfig.from_hf(
        {**base, "model_type": "xlm-roberta", "architectures": ["XLMRobertaForMaskedLM"]}
    )
    assert xlmr.architecture == "XLMRobertaModel" and xlmr.position_offset == 2 and xlmr.max_model_len == 512
    assert not xlmr.is_classifier and not xlmr.is_matryoshka
    bert = EncoderConfig.from_hf(
        {**base, "model_type": "bert", "pad_token_id": 0, "max_position_embeddings": 512}
    )
    assert bert.architecture == "BertModel" and bert.position_offset == 0 and bert.max_model_len == 512
    reranker = EncoderConfig.from_hf(
        {
            **base,
            "model_type": "xlm-roberta",
            "architectures": ["XLMRobertaForSequenceClassification"],
            "id2label": {"0": "LABEL_0"},
            "problem_type": "regression",
        }
    )
    assert reranker.is_classifier and reranker.num_labels == 1 and reranker.id2label == {0: "LABEL_0"}
    assert reranker.problem_type == "regression"
    matryoshka = EncoderConfig.from_hf({**base, "model_type": "bert", "matryoshka_dimensions": [32, 16]})
    assert matryoshka.is_matryoshka and matryoshka.matryoshka_dimensions == (32, 16)
    with pytest.raises(UnsupportedModelError, match="supported: BertModel, BertForSequenceClassification"):
        EncoderConfig.from_hf({**base, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(UnsupportedModelError, match="position_embedding_type 'relative_key'"):
        EncoderConfig.from_hf({**base, "model_type": "bert", "position_embedding_type": "relative_key"})
    with pytest.raises(UnsupportedModelError, match="hidden_act 'mish'"):
        EncoderConfig.from_hf({**base, "model_type": "bert", "hidden_act": "mish"})


# ---- the real all-MiniLM-L6-v2 against a transformers mean-pooling reference ----

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "Hi",
    "?",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France, with an estimated population of two million.",
    "I love programming in Python, especially when the tests pass on the first try.",
    "Quantum computers use qubits, which can represent both zero and one at the same time.",
    "El veloz murciélago hindú comía feliz cardillo y kiwi.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "3.14159 is an approximation of pi; e is about 2.71828.",
    "Email me at someone@example.com or call +1 (555) 123-4567.",
    "The stock market fell sharply today amid fears of rising interest rates and slowing growth in Asia.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She sells sea shells by the sea shore.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them.",
    "Neural networks learn representations from data.",
    "What time does the train to Berlin leave tomorrow morning?",
    "The mitochondria is the powerhouse of the cell.",
    "Can you recommend a good Italian restaurant nearby?",
    "Water boils at 100 degrees Celsius at sea level.",
    "The Eiffel Tower was completed in 1889 for the World's Fair.",
    "OK.",
    "Machine learning models can be biased if the training data is biased.",
    "I'm not sure whether I should take the job offer in Seattle or stay here in Boston with my family.",
    "A cat sat on the mat.",
    "Two dogs are playing in the park.",
    "The weather forecast predicts heavy rain and strong winds for the weekend along the coast.",
    "def add(a, b): return a + b",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY name;",
    "The patient was prescribed 500mg of amoxicillin three times daily for ten days.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon.",
    "Climate change is causing glaciers to melt at an unprecedented rate.",
    "Thank you very much!",
    "The committee will review all applications and notify successful candidates by the end of next month, "
    "after which interviews will be scheduled at the main office.",
    "Bananas are rich in potassium.",
    "He plays the guitar and sings in a band on weekends.",
    "The library opens at nine and closes at five on weekdays.",
    "Electric cars are becoming more affordable.",
    "Despite the rain, thousands of fans gathered outside the stadium to celebrate the championship victory.",
    "Why is the sky blue?",
    "Rayleigh scattering of sunlight by molecules in the atmosphere makes the sky appear blue.",
    "A woman is slicing an onion.",
    "A woman is cutting vegetables in the kitchen.",
    "The children built a sandcastle at the beach.",
    "Interest rates were left unchanged by the central bank.",
    "😀 emojis and unicode: naïve café résumé",
    "Supercalifragilisticexpialidocious",
]


class MiniLM:
    """The real all-MiniLM-L6-v2: our model, its tokenizer and its sentence-transformers pooling."""

    def __init__(self) -> None:
        self.folder = resolve_model("all-MiniLM-L6-v2").path
        self.model = load_ours(self.folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.pooling = read_pooling_config(self.folder)

    def embed(self, sentences: list[str]) -> torch.Tensor:
        """One flat batch through our model, pooled and normalised as the folder says."""
        encoded = self.tokenizer(sentences)
        ids, positions, types, lens = flat(
            list(zip(encoded["input_ids"], encoded["token_type_ids"], strict=True))
        )
        with torch.no_grad():
            hidden = self.model(ids, positions, types, lens)
        return embedding_output(pool(hidden, lens, self.pooling.method), None, self.pooling.normalize)

    def reference(self, sentences: list[str]) -> torch.Tensor:
        """sentence-transformers' recipe in transformers: padded batch, masked mean, L2 norm."""
        model = AutoModel.from_pretrained(self.folder, dtype=torch.float32).eval()
        batch = self.tokenizer(sentences, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.fixture(scope="module")
def minilm() -> MiniLM:
    return MiniLM()


def test_minilm_matches_transformers_mean_pooling(minilm: MiniLM):
    assert minilm.pooling == PoolingConfig(method="mean", normalize=True)
    lengths = [len(ids) for ids in minilm.tokenizer(SENTENCES)["input_ids"]]
    assert min(lengths) <= 3 and max(lengths) >= 40
    ref = minilm.reference(SENTENCES)
    one_batch = minilm.embed(SENTENCES)
    cuts = [0, 1, 8, 9, 30, 50]
    batches = torch.cat([minilm.embed(SENTENCES[a:b]) for a, b in itertools.pairwise(cuts)])
    for ours in (one_batch, batches):
        assert ours.shape == (len(SENTENCES), 384)
        distance = 1 - (ours * ref).sum(-1)
        assert distance.abs().max().item() < 1e-5


def test_minilm_similarity_is_meaningful(minilm: MiniLM):
    query, bread, horse = minilm.embed(SENTENCES[:3])
    assert query @ bread > query @ horse + 0.2


# ---- pooling functions ----


def test_pool_on_a_ragged_batch():
    hidden = torch.arange(12.0).reshape(6, 2).to(torch.bfloat16)
    lens = [1, 3, 2]
    assert pool(hidden, lens, "cls").tolist() == [[0, 1], [2, 3], [8, 9]]
    assert pool(hidden, lens, "last").tolist() == [[0, 1], [6, 7], [10, 11]]
    mean = pool(hidden, lens, "mean")
    assert mean.dtype == torch.float32 and mean.tolist() == [[0, 1], [4, 5], [9, 10]]
    with pytest.raises(ValueError, match="do not split"):
        pool(hidden, [1, 2], "mean")
    with pytest.raises(ValueError, match="unknown pooling method"):
        pool(hidden, lens, "max")  # type: ignore[arg-type]


def test_embedding_output_truncates_then_normalises():
    vectors = torch.tensor([[3.0, 4.0, 12.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(embedding_output(vectors, 2, True), torch.tensor([[0.6, 0.8], [1.0, 0.0]]))
    torch.testing.assert_close(embedding_output(vectors, None, True)[0], torch.tensor([3.0, 4.0, 12.0]) / 13)
    assert torch.equal(embedding_output(vectors, None, False), vectors)
    assert torch.equal(embedding_output(vectors, 1, False), vectors[:, :1])
    with pytest.raises(ValueError, match="between 1 and 3"):
        embedding_output(vectors, 4, True)


def test_classifier_activation():
    one = torch.tensor([[0.0], [2.0]])
    torch.testing.assert_close(classifier_activation(one, True), torch.sigmoid(one))
    three = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(classifier_activation(three, True), torch.softmax(three, -1))
    assert torch.equal(classifier_activation(three, False), three)
    torch.testing.assert_close(
        classifier_activation(three, True, "multi_label_classification"), torch.sigmoid(three)
    )
    assert torch.equal(classifier_activation(one, True, "regression"), one)


def test_read_pooling_config(tmp_path: Path):
    assert read_pooling_config(tmp_path) == PoolingConfig(method="cls", normalize=True)

    def write(modes: dict[str, bool], normalize: bool) -> None:
        modules = [
            {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if normalize:
            modules.append(
                {"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
            )
        (tmp_path / "modules.json").write_text(json.dumps(modules))
        (tmp_path / "1_Pooling").mkdir(exist_ok=True)
        settings = {"word_embedding_dimension": 8, "pooling_mode_mean_tokens": False, **modes}
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(settings))

    write({"pooling_mode_cls_token": True}, normalize=False)
    assert read_pooling_config(tmp_path) == PoolingConfig(method="cls", normalize=False)
    write({"pooling_mode_lasttoken": True}, normalize=True)
    assert read_pooling_config(tmp_path) == PoolingConfig(method="last", normalize=True)
    write({"pooling_mode_max_tokens": True}, normalize=True)
    with pytest.raises(UnsupportedModelError, match="pooling_mode_max_tokens is not supported"):
        read_pooling_config(tmp_path)
