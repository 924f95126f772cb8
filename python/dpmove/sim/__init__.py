"""Discrete-event simulator of agentic LLM inference (DualPath): workload, engine, reports."""
