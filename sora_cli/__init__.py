"""sora: fine-tune pre-trained transformers with sparse low-rank adapters."""

__version__ = "0.1.0"
