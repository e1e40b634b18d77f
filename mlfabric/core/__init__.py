"""Sans-IO protocol machines. Must not import asyncio, socket, time, threading or torch."""
