"""Tasks: prompts and verifiable rewards (the start of the data path)."""
