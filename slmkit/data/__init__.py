"""Data: packaged corpora, user file formats, tokenizers, and token caches packed for training."""
