"""Model folders: tiny local models for tests and demos (tiny.py), loading for the trainer (load.py)."""
