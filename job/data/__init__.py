"""Data stage: rows in any supported format → chat template → input_ids + labels → (packed) parquet cache.

formats.py reads and normalises rows, templates.py picks the chat template, masks.py renders,
tokenizes and masks, packing.py bins examples, prepare.py caches the result, commands.py is the CLI.
"""
