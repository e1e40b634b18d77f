"""Deterministic discrete-event simulation of many NodeCores on a virtual clock (no asyncio)."""
