"""The types both sides of the data path speak, and nothing else: a rollout and its group
(rollout.py), the sampling contract (sampling.py), the mismatch metrics (mismatch.py), the user
error (errors.py). Every other package may import these; these import no other package."""
