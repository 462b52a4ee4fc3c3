"""Structured output: constraints (JSON schema, regex, choice, grammar) compiled by llguidance,
cached per constraint, and a per-request matcher that masks logits and follows each token.

llguidance is imported only when the first constrained request arrives.

Import tokenmill.structured.compiler for GrammarCompiler / GrammarMatcher (it loads llguidance);
tokenmill.structured.mask holds the torch side, which the sampler imports.
"""
