"""Structured output: grammar-constrained decoding (JSON schema, regex, choice, EBNF) behind pluggable backends."""
