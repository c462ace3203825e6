from finetune_openai.cli import main

raise SystemExit(main())
