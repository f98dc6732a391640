"""Data stage: rows in any supported format → chat template → input_ids + labels → (packed) parquet cache.

readers.py streams rows out of files (FILE:LINE each, JSON read safely), formats.py normalises them into
rows.py's Row, templates.py picks the chat template, masks.py (with spans.py) renders, tokenizes and masks,
packing.py bins examples, prepare.py caches the result (prepared.py: the cache entry and its key),
preference.py does the same for DPO pairs, commands.py / pairs_cli.py are the CLI (preview.py shared).
"""
