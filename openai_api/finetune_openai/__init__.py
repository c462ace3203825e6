"""OpenAI's fine-tuning and files API over FineTuneJobs (`finetune-operator api`).

It runs from the trainer image: uploads are checked with the trainer's own data validator
(`finetune_trainer.data`), which the slim operator image does not carry.
"""
