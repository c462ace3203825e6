from finetune_operator.cli import main

raise SystemExit(main())
