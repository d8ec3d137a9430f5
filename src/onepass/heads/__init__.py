"""Trained draft heads that read the target's hidden states: Medusa-1 heads (heads/medusa.py)
and their files on disk, bound to the target they were trained for (heads/files.py)."""
