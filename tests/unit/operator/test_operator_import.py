"""The operator process stays light: no ML library is imported (issue 5)."""

import subprocess
import sys


def test_importing_the_operator_does_not_import_ml_libraries():
    code = ("import sys, finetune_operator.main, finetune_operator.cli; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'peft', 'trl', 'datasets', 'accelerate', 'bitsandbytes')); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_metric_names_are_listed_in_one_place():
    from finetune_operator.metrics import METRIC_NAMES, registry

    # Every metric the registry exports is listed, and nothing else (counters by their _total name).
    exported = {m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()}
    assert exported == set(METRIC_NAMES) and len(METRIC_NAMES) == len(set(METRIC_NAMES))
    assert {"finetune_operator_jobs", "finetune_operator_phase_transitions_total",
            "finetune_operator_leader"} <= exported
