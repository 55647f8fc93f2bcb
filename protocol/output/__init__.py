"""Output stages: the text a sample produced, turned into message deltas (content, reasoning, tool calls).

The chain a chat sample's text passes through, each stage a Sans-IO unit testable alone:
detokenize (`protocol.detokenizer`) -> stop strings (`protocol.stop`) -> reasoning parser
(`protocol.output.reasoning`) -> tool parser (`protocol.output.tool_parsers`). `MessageStages`
(`protocol.output.stages`) composes the last two; text deltas in, `MessageDelta`s out.
"""
