"""Run the cluster on Ray: router, planner and every worker are detached, named Ray actors.

    worker_actor.py   a prefill or decode worker (spawns `python -m worker`, the process `disagg serve` runs)
    router_actor.py   the router's FastAPI app on uvicorn, inside the actor; admin methods for the planner
    replica_pool.py   one pool's replicas: start, register, health-check, drain, stop
    planner_actor.py  the loop: sample metrics, ask the policy (deploy/planner.py), reconcile the pools
    launcher.py       `disagg deploy | status | shutdown` from any driver
    head.py           a loopback-only single-node Ray head as a child process (tests, laptops)

Importing this package does not import Ray; the modules above do.
"""
