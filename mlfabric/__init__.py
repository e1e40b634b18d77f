"""mlfabric: a peer-to-peer daemon for training neural networks across many servers."""

__version__ = "0.1.0"
