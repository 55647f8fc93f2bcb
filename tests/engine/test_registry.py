"""The registry: which architectures we run, on which kind of runner, serving which tasks."""

from __future__ import annotations

import pytest

from engine.model_config import ModelConfig, UnsupportedModelError
from engine.registry import architecture_support, encoder_architecture


@pytest.mark.parametrize(
    ("architecture", "convert", "num_labels", "kind", "tasks"),
    [
        ("LlamaForCausalLM", "auto", 0, "decoder", {"generate"}),
        ("Qwen2ForCausalLM", "embed", 0, "decoder", {"embed"}),
        ("BertModel", "auto", 0, "encoder", {"embed", "token_embed"}),
        ("XLMRobertaModel", "auto", 0, "encoder", {"embed", "token_embed"}),
        ("BertForSequenceClassification", "auto", 1, "encoder", {"classify", "score"}),
        ("RobertaForSequenceClassification", "auto", 3, "encoder", {"classify"}),
        ("XLMRobertaForSequenceClassification", "embed", 1, "encoder", {"embed", "token_embed"}),
    ],
)
def test_each_architecture_runs_on_its_kind_and_serves_its_tasks(architecture, convert, num_labels, kind, tasks):
    support = architecture_support(architecture, convert, num_labels)
    assert support.kind == kind and support.tasks == tasks


def test_encoders_are_recognised_by_architecture_or_model_type():
    assert encoder_architecture({"architectures": ["BertModel"]}) == "BertModel"
    assert encoder_architecture({"model_type": "xlm-roberta"}) == "XLMRobertaModel"
    assert encoder_architecture({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}) is None


def test_unknown_architectures_are_refused_naming_every_supported_one():
    with pytest.raises(UnsupportedModelError, match="BertForSequenceClassification.*SmolLM models are Llama"):
        architecture_support("GPT2LMHeadModel")
    with pytest.raises(UnsupportedModelError, match="XLMRobertaModel"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="choose auto or embed"):
        architecture_support("BertModel", "classify")
