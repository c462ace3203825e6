"""OpenAI's fine-tuning quick-start, unchanged but for where the model name comes from.

The `openai` client reads OPENAI_BASE_URL and OPENAI_API_KEY from the environment, so after
`make demo` prints its `export` lines this runs against the cluster instead of api.openai.com:

    python examples/openai_quickstart.py examples/data/openai-chat.jsonl
"""

import os
import sys
import time

from openai import OpenAI

client = OpenAI()
model = os.environ.get("FINETUNE_BASE_MODEL", "gpt-4o-mini-2024-07-18")
path = sys.argv[1] if len(sys.argv) > 1 else "mydata.jsonl"

training_file = client.files.create(file=open(path, "rb"), purpose="fine-tune")
print("uploaded", training_file.id, training_file.bytes, "bytes")

job = client.fine_tuning.jobs.create(training_file=training_file.id, model=model, suffix="pirate")
print("created", job.id, job.status)

seen = set()
while job.status not in ("succeeded", "failed", "cancelled"):
    time.sleep(5)
    job = client.fine_tuning.jobs.retrieve(job.id)
    for event in reversed(client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=10).data):
        if event.id not in seen:
            seen.add(event.id)
            print(f"  [{event.level}] {event.message}")
print("finished:", job.status, job.fine_tuned_model or job.error)
if job.status != "succeeded":
    sys.exit(1)

for checkpoint in client.fine_tuning.jobs.checkpoints.list(job.id).data:
    print("checkpoint", checkpoint.step_number, checkpoint.fine_tuned_model_checkpoint)

completion = client.chat.completions.create(
    model=job.fine_tuned_model,
    messages=[{"role": "system", "content": "You are a pirate."},
              {"role": "user", "content": "Describe a teapot."}],
    max_tokens=16,
)
print("answer:", repr(completion.choices[0].message.content))
