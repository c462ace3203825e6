"""#16 item 8: `Dataset.from_list` took its columns from the first record only, so a key only
later records carry (tools, a system prompt) was dropped without a word."""

from __future__ import annotations

from finetune_trainer.objectives.common import records_dataset


def test_every_records_keys_become_columns():
    records = [{"messages": [{"role": "user", "content": "hi"}]},
               {"messages": [{"role": "user", "content": "weather?"}],
                "tools": [{"type": "function", "function": {"name": "get_weather"}}]}]
    ds = records_dataset(records)
    assert set(ds.column_names) == {"messages", "tools"}
    assert ds[0]["tools"] is None and ds[1]["tools"][0]["function"]["name"] == "get_weather"


def test_uniform_records_are_unchanged():
    ds = records_dataset([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}])
    assert ds.column_names == ["prompt", "completion"] and ds[1] == {"prompt": "c", "completion": "d"}
