"""Rollouts: the actor that keeps the engine generating (actor.py), multi-turn episodes
(episode.py), the ledger of problems, the stream to the trainer. The Rollout type is in core/."""
