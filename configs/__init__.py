"""Shipped model configs (`--config NAME`), in Hugging Face config.json field names."""
