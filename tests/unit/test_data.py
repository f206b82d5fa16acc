"""Prompt datasets: sources, field mapping, rendering, length filter, order and resumption.

Real ``datasets`` loading of real files (the offline benchmark suite at ../shared/data and
files written here) and a real fast tokenizer: a byte-level BPE trained in the session with a
ChatML chat template (no pretrained tokenizer is on disk offline).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from megarl.data.answers import gold_answers
from megarl.data.formats import (
    BOXED_INSTRUCTION,
    FORMATS,
    find_format,
    get_format,
    gold_after_hashes,
    gold_from_solution,
)
from megarl.data.prompts import PromptDataset, PromptItem
from megarl.data.toy import Prompt
from megarl.errors import ConfigError, UserError
from tests.unit.offline_data import DATA, bpe_tokenizer, needs_data

PROBLEMS = [
    "What is 1+1?",
    "Compute the sum of all positive divisors of 36.",
    "A train travels 60 miles in 1.5 hours. What is its average speed in miles per hour?",
    "Let $f(x)=x^2+3x+2$. Find the product of the roots of $f$, and explain every step of the "
    "computation in great detail, because long prompts should be dropped by the length filter.",
    "How many primes are less than 20?",
    "Solve for $x$: $2x+3=11$.",
    "What is $\\frac{1}{2}+\\frac{1}{3}$?",
]
ANSWERS = ["2", "91", "40", "2", "8", "4", "\\frac{5}{6}"]


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return bpe_tokenizer(PROBLEMS * 20 + [BOXED_INSTRUCTION] * 20)


def rows() -> list[dict]:
    return [{"problem": p, "answer": a, "extra": i} for i, (p, a) in enumerate(
        zip(PROBLEMS, ANSWERS, strict=True))]


def dapo_rows() -> list[dict]:
    """Rows shaped like BytedTsinghua-SIA/DAPO-Math-17k."""
    return [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": p}],
            "reward_model": {"ground_truth": a, "style": "rule-lighteval/MATH_v2"},
        }
        for p, a in zip(PROBLEMS, ANSWERS, strict=True)
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make(source: Path | str, tokenizer, **kw) -> PromptDataset:
    kw.setdefault("max_prompt_len", 4096)
    kw.setdefault("seed", 0)
    return PromptDataset(str(source), tokenizer, **kw)


# ---- sources and field mapping ---------------------------------------------------------------


def test_jsonl_dapo_rows_use_nested_answer_and_last_user_message(tmp_path, tokenizer):
    ds = make(write_jsonl(tmp_path / "DAPO-Math-17k.jsonl", dapo_rows()), tokenizer,
              template="plain", shuffle=False)
    assert ds.format is FORMATS["dapo_math_17k"]
    assert (ds.prompt_key, ds.answer_key) == ("prompt", "reward_model.ground_truth")
    items = ds.next_batch(len(PROBLEMS))
    assert [it.prompt_text for it in items] == PROBLEMS  # no instruction: DAPO carries its own
    assert [it.answer for it in items] == [(a,) for a in ANSWERS]
    assert {it.dataset for it in items} == {"dapo_math_17k"}


def test_explicit_keys_on_a_json_array_file(tmp_path, tokenizer):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"q": {"text": p}, "gold": a} for p, a in zip(
        PROBLEMS, ANSWERS, strict=True)]))
    ds = make(path, tokenizer, prompt_key="q.text", answer_key="gold", template="plain",
              shuffle=False)
    assert ds.format is None and ds.name == "mine" and ds.instruction is None
    items = ds.next_batch(3)
    assert [(it.index, it.prompt_text, it.answer) for it in items] == [
        (i, PROBLEMS[i], (ANSWERS[i],)) for i in range(3)]


def test_parquet_file(tmp_path, tokenizer):
    path = tmp_path / "problems.parquet"
    datasets.Dataset.from_list(rows()).to_parquet(str(path))
    ds = make(path, tokenizer, template="plain", shuffle=False)
    assert len(ds) == ds.num_rows == len(PROBLEMS)
    assert [it.answer for it in ds] == [(a,) for a in ANSWERS]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, tokenizer):
    data = datasets.Dataset.from_list(rows())
    data.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": data, "test": data.select([0, 1])}).save_to_disk(
        str(tmp_path / "dict"))
    assert len(make(tmp_path / "single", tokenizer, split="ignored")) == len(PROBLEMS)
    assert len(make(tmp_path / "dict", tokenizer, split="test")) == 2
    assert len(make(tmp_path / "dict" / "train", tokenizer)) == len(PROBLEMS)  # one split's folder
    with pytest.raises(ConfigError, match=r"data\.split='dev'.*splits: train, test"):
        make(tmp_path / "dict", tokenizer, split="dev")


def test_folder_of_data_files_goes_through_load_dataset(tmp_path, tokenizer):
    folder = tmp_path / "repo"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows())
    write_jsonl(folder / "test.jsonl", rows()[:2])
    assert len(make(folder, tokenizer)) == len(PROBLEMS)
    assert len(make(folder, tokenizer, split="test")) == 2


@needs_data
@pytest.mark.parametrize("split,rows_", [("aime", 30), ("amc", 83), ("math", 500),
                                         ("minerva", 272), ("olympiad_bench", 675)])
def test_offline_eval_sets_load_with_normalised_answers(tokenizer, split, rows_):
    suite = DATA / "evaluation_suite"
    by_split = make(suite, tokenizer, split=split, shuffle=False)
    by_folder = make(suite / split, tokenizer, shuffle=False)
    assert by_split.format is by_folder.format is FORMATS[split]
    assert by_split.num_rows == rows_ and by_split.num_dropped == 0
    items = list(by_split)
    assert [(i.index, i.answer) for i in items] == [(i.index, i.answer) for i in by_folder]
    raw = datasets.load_from_disk(str(suite / split))
    for item, gold in zip(items, raw["answer"], strict=True):  # every alternative, cleaned
        assert isinstance(item.answer, tuple) and item.answer == gold_answers(gold)
        assert all(a and a == a.strip() and not a.startswith("['") for a in item.answer)
    assert all(i.prompt_text.endswith(BOXED_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
               for i in items)
    first = raw[0]["problem"]
    assert items[0].prompt_text.startswith(f"<|im_start|>user\n{first}\n{BOXED_INSTRUCTION}")
    if split == "amc":
        assert raw[0]["answer"] == 142.0 and items[0].answer == ("142",)
        assert not any(i.answer[0].endswith(".0") for i in items)
    if split == "minerva":  # alternative forms of one answer are all kept
        assert raw[0]["answer"] == ["9.6\n"] and items[0].answer == ("9.6",)
        assert items[50].answer == ("-\\frac{1}{3}", "-1/3")
        assert sum(len(i.answer) > 1 for i in items) == 40  # distinct forms, of 75 lists


@needs_data
def test_offline_gsm8k_train_set(tokenizer):
    ds = make(DATA / "train" / "gsm_8k", tokenizer, max_prompt_len=64)
    assert ds.format is FORMATS["gsm_8k"] and ds.num_rows == 8792
    assert 0 < ds.num_dropped < ds.num_rows and len(ds) == ds.num_rows - ds.num_dropped
    batch = ds.next_batch(16)
    assert all(len(it.prompt_ids) <= 64 and it.answer[0].isdigit() for it in batch)


# ---- rendering and length filter -------------------------------------------------------------


def test_chat_template_renders_and_tokenises_like_the_tokenizer(tmp_path, tokenizer):
    ds = make(write_jsonl(tmp_path / "rows.jsonl", rows()), tokenizer, shuffle=False,
              instruction="Put the answer in \\boxed{}.")
    for item in ds.next_batch(len(PROBLEMS)):
        message = [{"role": "user", "content": f"{PROBLEMS[item.index]}\nPut the answer in "
                    "\\boxed{}."}]
        rendered = tokenizer.apply_chat_template(message, add_generation_prompt=True,
                                                 tokenize=False)
        assert item.prompt_text == rendered
        assert rendered.endswith("<|im_start|>assistant\n")
        assert item.prompt_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        direct = tokenizer.apply_chat_template(message, add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
        assert item.prompt_ids == list(direct)
        assert item.prompt_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_plain_template_keeps_text_and_adds_special_tokens(tmp_path, tokenizer):
    ds = make(write_jsonl(tmp_path / "rows.jsonl", rows()), tokenizer, template="plain",
              shuffle=False, instruction="")
    item = ds.next_batch(1)[0]
    assert item.prompt_text == PROBLEMS[0]
    assert item.prompt_ids == tokenizer(PROBLEMS[0])["input_ids"]
    assert item.prompt_ids[0] == tokenizer.bos_token_id


def test_prompts_over_max_len_are_dropped_and_counted(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "rows.jsonl", rows())
    full = make(source, tokenizer, shuffle=False)
    lengths = [len(it.prompt_ids) for it in full]
    limit = sorted(lengths)[len(lengths) // 2]
    ds = make(source, tokenizer, max_prompt_len=limit, seed=3)
    over = {i for i, n in enumerate(lengths) if n > limit}
    assert over and ds.num_dropped == len(over) and len(ds) == len(PROBLEMS) - len(over)
    served = ds.next_batch(3 * len(ds))
    assert {it.index for it in served} == set(range(len(PROBLEMS))) - over
    assert max(len(it.prompt_ids) for it in served) <= limit
    with pytest.raises(ConfigError, match=r"rollout\.max_prompt_len=2: drops all 7 prompts"):
        make(source, tokenizer, max_prompt_len=2)


def math_rows() -> list[dict]:
    """Rows shaped like MATH (DigitalLearningGmbH/MATH-lighteval): a level per problem."""
    levels = ["Level 1", "Level 3", "Level 5", "Level 2", "Level 4", "Level 3", "Level ?"]
    return [{"problem": p, "solution": f"so \\boxed{{{a}}}", "level": lv,
             "meta": {"level": int(lv[-1]) if lv[-1].isdigit() else 0}}
            for p, a, lv in zip(PROBLEMS, ANSWERS, levels, strict=True)]


def test_train_filter_keeps_rows_whose_column_holds_a_listed_value(tmp_path, tokenizer):
    """data.train_filter: MATH levels 3-5 (the UP paper's Table A3 training set)."""
    source = write_jsonl(tmp_path / "MATH-lighteval.jsonl", math_rows())
    ds = make(source, tokenizer, shuffle=False,
              where={"level": ["Level 3", "Level 4", "Level 5"]})
    assert ds.format is FORMATS["competition_math"]
    assert ds.num_rows == len(ds) == 4
    assert [it.answer for it in ds] == [(ANSWERS[i],) for i in (1, 2, 4, 5)]
    assert [it.index for it in ds] == [0, 1, 2, 3]  # rows of the filtered dataset
    # a dotted key reaches a nested column; keys combine with "and"
    nested = make(source, tokenizer, shuffle=False, where={"meta.level": [3, 4, 5],
                                                           "level": ["Level 3"]})
    assert [it.answer for it in nested] == [(ANSWERS[i],) for i in (1, 5)]
    # a dataset on disk that cannot be written to (the shared benchmark copies) still filters
    folder = tmp_path / "on_disk"
    datasets.Dataset.from_list(math_rows()).save_to_disk(str(folder))
    for path in [folder, *folder.iterdir()]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        on_disk = make(folder, tokenizer, answer_key="solution", where={"level": ["Level 5"]})
        assert [it.answer for it in on_disk] == [(ANSWERS[2],)]
    finally:
        for path in [folder, *folder.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_train_filter_errors_name_the_field(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "MATH-lighteval.jsonl", math_rows())
    with pytest.raises(ConfigError, match=r"^data\.train_filter='difficulty': not found .*"
                                          r"columns: problem, solution, level, meta"):
        make(source, tokenizer, where={"difficulty": ["hard"]})
    with pytest.raises(ConfigError, match=r"^data\.train_filter=\{'level': \[3\]\}: keeps none "
                                          r"of the 7 rows"):
        make(source, tokenizer, where={"level": [3]})  # the column holds "Level 3", not 3


def test_train_filter_applies_to_training_prompts_only(tmp_path, tokenizer):
    from megarl.assemble import build_prompt_source
    from megarl.config import load_config

    source = write_jsonl(tmp_path / "MATH-lighteval.jsonl", math_rows())
    quickstart = Path(__file__).resolve().parents[2] / "examples/configs/quickstart.yaml"
    config = load_config(quickstart, [
        f"data.train={source}", "data.train_filter={level: [Level 4]}", "data.template=chat",
        "rollout.max_prompt_len=4096", "model.hf_config.max_position_embeddings=8192"])
    train = build_prompt_source(config, tokenizer)
    assert [it.answer for it in train.next_batch(2)] == [(ANSWERS[4],)] * 2
    bench = build_prompt_source(config, tokenizer, source=str(source), field="data.eval")
    assert len(bench) == len(PROBLEMS)


# ---- order and resumption --------------------------------------------------------------------


def test_order_is_a_seeded_permutation_per_epoch(tmp_path, tokenizer):
    data = [{"problem": f"problem number {i}", "answer": str(i)} for i in range(50)]
    source = write_jsonl(tmp_path / "many.jsonl", data)
    ds = make(source, tokenizer, seed=7)
    epochs = [[it.index for it in ds.next_batch(50)] for _ in range(3)]
    assert all(sorted(e) == list(range(50)) for e in epochs)  # every row once per epoch
    assert epochs[0] != epochs[1] != epochs[2]
    for e, order in enumerate(epochs):
        assert order == np.random.default_rng([7, e]).permutation(50).tolist()
    again = make(source, tokenizer, seed=7)
    assert [it.index for it in again.next_batch(150)] == sum(epochs, [])
    assert make(source, tokenizer, seed=8).epoch_order(0).tolist() != epochs[0]
    assert make(source, tokenizer, shuffle=False).epoch_order(5).tolist() == list(range(50))
    assert [it.answer for it in again.items([3, 41])] == [("3",), ("41",)]


def test_resume_yields_identical_batches_across_epochs(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "rows.jsonl", rows())
    ds = make(source, tokenizer, seed=11)
    for _ in range(3):
        ds.next_batch(3)  # 9 prompts: epoch 0 done, 2 into epoch 1
    state = ds.state_dict()
    assert state == {"epoch": 1, "position": 2}
    expected = [ds.next_batch(4) for _ in range(5)]  # crosses two more epoch boundaries
    resumed = make(source, tokenizer, seed=11)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert [resumed.next_batch(4) for _ in range(5)] == expected
    assert resumed.state_dict() == ds.state_dict()
    assert isinstance(expected[0][0], PromptItem)

    fresh = make(source, tokenizer, seed=11)
    fresh.next_batch(len(PROBLEMS))
    assert fresh.state_dict() == {"epoch": 1, "position": 0}
    fresh.load_state_dict({"epoch": 0, "position": len(PROBLEMS)})  # end of epoch 0 == start of 1
    assert fresh.state_dict() == {"epoch": 1, "position": 0}
    with pytest.raises(UserError, match="beyond this dataset's 7 prompts"):
        fresh.load_state_dict({"epoch": 0, "position": 8})
    with pytest.raises(UserError, match="epoch=None"):
        fresh.load_state_dict({"position": 0})


# ---- errors ----------------------------------------------------------------------------------


def test_missing_path_names_the_field(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match=r"^data\.train='.*nope\.jsonl': no such file"):
        make(tmp_path / "nope.jsonl", tokenizer)
    with pytest.raises(ConfigError, match=r"^data\.eval='\./missing/dir': no such file"):
        make("./missing/dir", tokenizer, field="data.eval")
    (tmp_path / "bad.jsonl").write_text('{"problem": "1+1",\n')
    with pytest.raises(UserError, match=r"^data\.train='.*bad\.jsonl': cannot load: JSON parse"):
        make(tmp_path / "bad.jsonl", tokenizer)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"empty\.jsonl': the file is empty$"):
        make(tmp_path / "empty.jsonl", tokenizer)
    (tmp_path / "rows.csv").write_text("problem,answer\n1+1,2\n")
    with pytest.raises(ConfigError, match=r"unsupported file type; use \.jsonl"):
        make(tmp_path / "rows.csv", tokenizer)


def test_missing_keys_list_what_exists(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "rows.jsonl", rows())
    with pytest.raises(ConfigError) as err:
        make(source, tokenizer, prompt_key="question")
    message = str(err.value)
    assert message.startswith("data.prompt_key='question': not found in ")
    assert "(columns: problem, answer, extra)" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"^data\.answer_key='gold': .*columns: problem"):
        make(source, tokenizer, answer_key="gold")
    dapo = write_jsonl(tmp_path / "dapo.jsonl", dapo_rows())
    with pytest.raises(ConfigError, match=r"keys of reward_model: ground_truth, style"):
        make(dapo, tokenizer, prompt_key="prompt", answer_key="reward_model.answer")
    with pytest.raises(ConfigError, match=r"^data\.prompt_key='data_source.x': .*not a mapping"):
        make(dapo, tokenizer, prompt_key="data_source.x", answer_key="reward_model.ground_truth")
    with pytest.raises(ConfigError, match=r"^data\.prompt_key='reward_model': holds dict"):
        make(dapo, tokenizer, prompt_key="reward_model", answer_key="data_source")
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"problem": "1+1", "answer": " "}])
    with pytest.raises(UserError, match=r"^data\.answer_key='answer': row 0 of .*is empty"):
        make(blank, tokenizer)  # checked up front, not when the row is served


def test_bad_settings_are_config_errors(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "rows.jsonl", rows())
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ConfigError, match=r"^data\.template='chat': .*use data\.template=plain"):
        make(source, bare)
    assert make(source, bare, template="plain").next_batch(1)[0].prompt_text
    with pytest.raises(ConfigError, match=r"^data\.template='raw'"):
        make(source, tokenizer, template="raw")
    with pytest.raises(ConfigError, match=r"^trainer\.seed=-1"):
        make(source, tokenizer, seed=-1)
    with pytest.raises(UserError, match=r"^format 'nope' is unknown; known: dapo"):
        make(source, tokenizer, format="nope")


def test_hub_name_goes_through_load_dataset(tmp_path):
    """A hub name reaches datasets.load_dataset; offline it fails as a one-line UserError."""
    code = (
        "from megarl.data.prompts import load_rows\n"
        "from megarl.errors import UserError\n"
        "try:\n    load_rows('megarl-test/no-such-dataset')\n"
        "except UserError as e:\n    print('USERERROR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, cwd=Path(__file__).resolve().parents[2])
    line = out.stdout.strip()
    assert line.startswith("USERERROR data.train='megarl-test/no-such-dataset': cannot load"), (
        out.stdout + out.stderr)
    assert "\n" not in line


# ---- formats ---------------------------------------------------------------------------------


def test_format_lookup_by_name_hub_name_and_path(tmp_path):
    assert find_format("BytedTsinghua-SIA/DAPO-Math-17k").name == "dapo_math_17k"
    assert find_format("openai/gsm8k").hub_config == "main"
    assert find_format("DigitalLearningGmbH/MATH-lighteval").name == "competition_math"
    assert find_format("hendrycks/competition_math").answer_key == "solution"
    assert find_format("evaluation_suite/aime").name == "aime"
    assert find_format("lighteval/MATH") is None  # a hub name matches only in full
    assert find_format("someone/unknown") is None
    suite = tmp_path / "data" / "evaluation_suite"
    (suite / "amc").mkdir(parents=True)
    assert find_format(str(suite / "amc")).name == "amc"
    assert find_format(str(suite), split="minerva").name == "minerva"
    assert find_format(str(tmp_path / "x" / "train" / "gsm_8k")).name == "gsm_8k"
    assert find_format(str(tmp_path / "dapo-math-17k.parquet")).name == "dapo_math_17k"
    assert get_format("MATH-500") is FORMATS["math"]
    assert FORMATS["dapo_math_17k"].instruction is None
    assert FORMATS["aime"].instruction == BOXED_INSTRUCTION


def test_gold_functions_of_solution_formats():
    assert gold_after_hashes("She has 3+4=<<3+4=7>>7 apples.\n#### 7") == ("7",)
    assert gold_from_solution("So $x = \\boxed{\\frac{1}{2}}$.") == ("\\frac{1}{2}",)
    assert gold_from_solution("First \\boxed{1}, then \\boxed{2}.") == ("2",)
    with pytest.raises(UserError, match="no '#### <answer>' line"):
        gold_after_hashes("She has 7 apples.")
    with pytest.raises(UserError, match="no \\\\boxed"):
        gold_from_solution("So x is one half.")


def test_a_formats_gold_reader_applies_to_its_own_answer_column_only(tmp_path, tokenizer):
    records = [{"problem": p, "solution": f"Work. So \\boxed{{{a}}}.", "answer": f"${a}$"}
               for p, a in zip(PROBLEMS, ANSWERS, strict=True)]
    source = write_jsonl(tmp_path / "MATH-lighteval.jsonl", records)
    by_solution = make(source, tokenizer, shuffle=False)
    assert by_solution.format is FORMATS["competition_math"]
    assert [it.answer for it in by_solution] == [(a,) for a in ANSWERS]
    by_answer = make(source, tokenizer, shuffle=False, answer_key="answer")  # no \boxed in it
    assert [it.answer for it in by_answer] == [(a,) for a in ANSWERS]


def test_items_have_the_toy_prompt_fields_the_trainer_reads(tmp_path, tokenizer):
    """The trainer and the evaluator take either source: same field names and meaning."""
    toy_fields = {f.name for f in dataclasses.fields(Prompt)}
    assert toy_fields <= {f.name for f in dataclasses.fields(PromptItem)}
    item = make(write_jsonl(tmp_path / "rows.jsonl", rows()), tokenizer).next_batch(1)[0]
    assert isinstance(item.index, int) and isinstance(item.prompt_text, str)
    assert item.prompt_ids == tokenizer(item.prompt_text, add_special_tokens=False)["input_ids"]
    assert item.answer == (ANSWERS[item.index],)
