"""Chat: a local causal LM behind bounded sessions, streaming, and a guard."""
