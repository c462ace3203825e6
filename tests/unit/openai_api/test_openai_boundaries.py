"""Package boundaries: the operator never loads the API (nor the trainer it imports), and the
API loads the trainer's data validator without any ML library."""

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "vllm")


def loaded_after(statement: str, prefixes: tuple[str, ...]) -> list[str]:
    code = (f"import json, sys; {statement}; "
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({prefixes!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_operator_does_not_import_the_openai_api_or_the_trainer():
    assert loaded_after("import finetune_operator.main, finetune_operator.cli",
                        ("finetune_openai", "finetune_trainer")) == []


def test_the_openai_api_validates_uploads_without_ml_libraries(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    statement = (f"import finetune_openai.server, finetune_openai.cli; from finetune_openai.files import validate; "
                 f"validate(__import__('pathlib').Path({str(path)!r}), 'chat')")
    assert loaded_after(statement, HEAVY) == []
