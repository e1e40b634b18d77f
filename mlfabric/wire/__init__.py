"""Bytes <-> validated messages. Sans-IO: imports no asyncio, socket, time, threading or torch."""
