"""tokur-decode: uncertainty-guided decoding for LLMs."""
__version__ = "0.1.0"
