"""Evaluations: calibration (AA-Omniscience style), tool calls (K2 Vendor Verifier style), coding,
LLM judges and human review."""
