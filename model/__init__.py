"""MiniMind decoder with a pluggable feed-forward block (see model/ffn.py for the registry)."""
