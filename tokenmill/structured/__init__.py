"""Structured output: constraints (JSON schema, regex, choice, grammar) compiled by llguidance,
cached per constraint, and a per-request matcher that masks logits and follows each token.

llguidance is imported only when the first constrained request arrives.

Import tokenmill.structured.compiler for GrammarCompiler / GrammarMatcher (it loads llguidance).
The engine core fills a numpy bitmask from the matchers and hands it to the model runner in the
step record; tokenmill.model.grammar_mask applies it to the logits (the torch side).
"""
