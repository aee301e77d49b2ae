"""Where the roles of a run live: in this process (`cluster.backend: local`) or in Ray actors.

    ray_cluster.py   start or join a Ray cluster for the run; where each role ran (cluster.json)
    engine_role.py   an engine (RolloutEngine) in a Ray actor, and its stand-in on the driver
    trainer_role.py  the trainer ranks (one torch.distributed group, FSDP2) as Ray actors
"""
