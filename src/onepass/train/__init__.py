"""`onepass train`: draft heads trained on this machine's CPU from the target's own hidden
states (sharegpt.py: the data; features.py: the hidden states, computed once and cached;
medusa.py: the training loop)."""
