"""asyncio side of mlfabric: TCP transport (control + bulk lanes), driver, control API, daemon, cluster tools.

Only this package (and the CLI) touches sockets, the clock and the event loop; ``core/`` and ``wire/``
stay sans-IO. Nothing here imports torch.
"""
