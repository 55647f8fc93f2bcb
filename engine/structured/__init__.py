"""Structured output: constraints compiled into guides off the engine thread, applied as masks.

`compiler.GuideCompiler` compiles and caches; `guides` holds the two backends (outlines-core for
JSON schema / regex / choice, llguidance for grammars, as outlines itself does); the mask is the
`engine.processors.grammar.GrammarMask` logits processor.
"""

from engine.structured.compiler import CompileTiming, GuideCompiler
from engine.structured.guides import CompiledGuide, ConstraintError, Matcher

__all__ = ["CompileTiming", "CompiledGuide", "ConstraintError", "GuideCompiler", "Matcher"]
