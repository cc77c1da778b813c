"""What keeps users' files and inputs safe: safe writes and locks (files.py), one-line input checks (inputs.py)."""
