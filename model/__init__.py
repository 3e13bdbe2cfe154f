"""MiniMind decoder with a pluggable feed-forward block (see model/registry.py for the FFN registry)."""
