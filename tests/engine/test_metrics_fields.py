"""The metrics exporter reads EngineStats by field name: every name it reads must exist, or a
rename would silently report zeros on a dashboard."""

from __future__ import annotations

from engine.core import EngineStats
from sansllm.metrics import COUNTERS, GAUGES


def test_every_exported_metric_reads_an_engine_stats_field():
    fields = set(EngineStats.__struct_fields__)
    read = {field for _, field, _ in (*COUNTERS, *GAUGES)} | {"spec_decode_num_accepted_tokens_per_pos"}
    assert read <= fields, read - fields
