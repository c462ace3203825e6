"""What the kopf routes (`finetune_operator.main`) call for FineTuneJobs: `finetunejob.py`
(children and status), `facts.py` (what admission reads from the cluster), `records.py`
(Events and metrics of transitions). The Kubernetes client is `finetune_operator.kube`.
"""
