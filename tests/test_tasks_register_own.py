"""README "Register your own dataset", run as written (its code blocks are executed)."""

import json
import os
import pathlib
import re
import sys

import pytest
from _shared_data import T5_VOCAB

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = T5_VOCAB


def _doc_blocks():
    text = (REPO / "README.md").read_text()
    section = text.split("## Register your own dataset", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_SBS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DISTILL_SBS_VOCAB", str(VOCAB))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    (tmp_path / "code").mkdir()
    yield tmp_path
    sys.modules.pop("my_tasks", None)


def _records(n, split):
    for i in range(n):
        a, b = i % 7, i % 5
        yield {
            "id": f"{split}-{i}",
            "input": f"What is {a} plus {b}?",
            "label": str(a + b),
            "teachers": {
                "gpt": [
                    {
                        "rationale": f"{a} + {b} = {a + b}.",
                        "label": str(a + b),
                        "raw": f"{a} + {b} = {a + b}. The answer is {a + b}.",
                    }
                ]
            },
        }


def test_readme_jsonl_dataset(data_dir):
    register_block, use_block, _ = _doc_blocks()
    folder = data_dir / "data" / "mydata"
    folder.mkdir(parents=True)
    for split, n in (("train", 40), ("test", 10)):
        with open(folder / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in _records(n, split))
    (data_dir / "code" / "my_tasks.py").write_text(register_block)
    namespace = {}
    exec(compile(use_block, "docs/data.md", "exec"), namespace)
    batch = next(namespace["batches"].as_numpy_iterator())
    assert batch["decoder_target_tokens"].shape == (8, 128)
    assert set(batch["decoder_objective_ids"][batch["decoder_loss_weights"] > 0].tolist()) <= {0, 1}
    assert [o.name for o in namespace["get_objectives"]("mydata_dss")] == ["label", "rationale"]
    from distill_sbs.data import build_examples

    assert len(build_examples("mydata", "cot", 0, "train")) == 40
    assert build_examples("mydata", "multiteacher", 1, "test")[0]["inputs"].startswith(
        "[rationale:gpt] What is 0 plus 0?"
    )


def test_readme_unseen_dss_layout(data_dir):
    *_, dss_block = _doc_blocks()
    folder = data_dir / "data" / "mynli"
    (folder / "llm").mkdir(parents=True)
    labels = ["entailment", "neutral", "contradiction"]
    for split, n in (("train", 12), ("test", 6)):
        rows = [
            {"premise": f"A cat sleeps {i}.", "hypothesis": "An animal rests.", "label": i % 3}
            for i in range(n)
        ]
        (folder / f"mynli_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        outs = [
            f"Sleeping is resting. So the answer is {labels[i % 3]}.\nPremise: x" for i in range(n)
        ]
        (folder / "llm" / f"{split}_CoT_0.json").write_text(json.dumps(outs))
    namespace = {}
    exec(
        compile("from distill_sbs.data import register_dataset\n" + dss_block, "docs", "exec"),
        namespace,
    )
    from distill_sbs.data import get_dataset, get_objectives

    for method in ("dss", "multiteacher", "cot", "finetune"):
        ds = get_dataset(
            f"mynli_{method}",
            task_feature_lengths={"inputs": 32, "targets": 16},
            split="train",
            batch_size=2,
            seed=0,
        )
        batch = next(ds.as_numpy_iterator())
        n_objectives = len(get_objectives(f"mynli_{method}"))
        assert batch["decoder_objective_ids"].max() < n_objectives
    assert os.environ["DISTILL_SBS_DATA_DIR"].endswith("data")


def test_builtin_esnli_reads_its_layout_with_a_validation_split(data_dir):
    import distill_sbs.tasks  # noqa: F401

    from distill_sbs.data import get_dataset_spec, load_records

    folder = data_dir / "data" / "esnli"
    (folder / "llm").mkdir(parents=True)
    for split in ("train", "valid", "test"):
        rows = [{"premise": f"P{i}.", "hypothesis": "H.", "label": i % 3} for i in range(4)]
        (folder / f"esnli_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        outs = ["Because. Answer: neutral\n\nPremise: next"] * 4
        (folder / "llm" / f"{split}_CoT_0.json").write_text(json.dumps(outs))
    assert get_dataset_spec("esnli").splits == ("train", "validation", "test")
    records = load_records("esnli", "validation")
    assert records[1].label == "neutral" and records[1].input == "premise: P1. hypothesis: H."
    assert records[0].teachers["palm"][0].label == "neutral"
