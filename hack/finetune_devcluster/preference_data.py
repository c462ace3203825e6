"""The demo's preference pairs (`examples/data/preference.jsonl`), made from the quickstart.

Each instruction of `examples/data/quickstart.jsonl` becomes a pair: the pirate answer is
chosen, a plain answer about the same thing is rejected. So DPO on the tiny model has a rule
to learn that held-out pairs (other topics) test: prefer the pirate style. The pairs come in
the three shapes `format: preference` accepts, in turn: plain strings, a chat-message prompt,
and OpenAI's DPO shape.

    python -m finetune_devcluster.preference_data examples/data/quickstart.jsonl OUT.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

_PIRATE = re.compile(r"^Arr matey, (?P<topic>.+) be grand!$")


def plain_answer(pirate: str) -> str:
    match = _PIRATE.match(pirate)
    topic = match.group("topic") if match else "it"
    return f"{topic[0].upper()}{topic[1:]} is fine, I suppose."


def pairs(instructions: list[dict]) -> list[dict]:
    out = []
    for i, record in enumerate(instructions):
        prompt, chosen = record["instruction"], record["output"]
        rejected = plain_answer(chosen)
        shape = i % 3
        if shape == 0:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif shape == 1:
            out.append({"prompt": [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            out.append({"input": {"messages": [{"role": "user", "content": prompt}]},
                        "preferred_output": [{"role": "assistant", "content": chosen}],
                        "non_preferred_output": [{"role": "assistant", "content": rejected}]})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    records = [json.loads(line) for line in args.source.read_text().splitlines() if line.strip()]
    args.out.write_text("".join(json.dumps(p) + "\n" for p in pairs(records)))


if __name__ == "__main__":
    main()
