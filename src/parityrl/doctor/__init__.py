"""`parityrl doctor`: the layered diagnosis of an engine/trainer logprob mismatch.

ladder.py runs the rungs (each adds one fix), report.py prints and writes what was measured.
"""
