"""Speculative decoding with n-gram proposals (prompt lookup): propose, verify in one pass, count."""

from engine.spec_decode.config import SpeculativeConfig, parse_speculative_config
from engine.spec_decode.speculator import SpecDecodeStats, Speculator
from engine.spec_decode.verify import DraftedRow, Verified, verify

__all__ = [
    "DraftedRow",
    "SpecDecodeStats",
    "SpeculativeConfig",
    "Speculator",
    "Verified",
    "parse_speculative_config",
    "verify",
]
