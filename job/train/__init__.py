"""Training: launch (topology, configs, spawn), sft (one rank), export (verify, merge), plan (dry run)."""
