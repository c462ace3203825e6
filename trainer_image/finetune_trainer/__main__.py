"""`python -m finetune_trainer`: what the trainer pod runs."""

from .cli import main

raise SystemExit(main())
