"""Serving: an InferenceService becomes a vLLM Deployment and the objects around it.

| module | what |
| --- | --- |
| `common.py` | labels, metadata, URL, served names, phases |
| `checks.py` | what may be served (pure) |
| `deployment.py`, `service.py`, `disruption.py`, `monitoring.py`, `autoscaling.py` | one pure builder per child kind |
| `rollout.py`, `status.py` | the rollout's state and the status (pure) |
| `handlers.py` | reconcile: read, check, apply, write status |
| `routes.py` | the kopf decorators |
"""
