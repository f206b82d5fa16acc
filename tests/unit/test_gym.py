"""reasoning-gym tasks as data and reward (megarl/data/gym.py), on the real library."""

from __future__ import annotations

import pickle

import pytest

from megarl.assemble import Rewards, build_prompt_source, check_paths
from megarl.config import Config
from megarl.data.gym import GymGold, extract_answer, gym_rewards, split_of
from megarl.errors import ConfigError, UserError
from megarl.evaluate import load_benchmark
from tests.unit.offline_data import bpe_tokenizer

TASK = "reasoning_gym:chain_sum"
OPTIONS = {"chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}}


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"State the final answer to the following arithmetic problem: {a} + {b} = {a + b}"
             for a in range(30) for b in range(30)]
    return bpe_tokenizer(texts)


def config(**data) -> Config:
    fields = {"train": TASK, "eval": [TASK], "reward": "reasoning_gym", "template": "chat",
              "reasoning_gym": OPTIONS} | data
    return Config.from_dict({
        "model": {"hf_config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "num_key_value_heads": 1,
                                "intermediate_size": 64},
                  "random_init": True, "tokenizer": "unused"},
        "data": fields, "rollout": {"max_prompt_len": 128, "max_response_len": 16},
        "eval": {"max_problems": 60}})


def test_held_out_problems_are_never_trained_on(tokenizer) -> None:
    cfg = config()
    train = build_prompt_source(cfg, tokenizer)
    seen = {p.prompt_text for p in train.next_batch(3000)}
    bench = load_benchmark(cfg, tokenizer, TASK)
    held_out = [p.prompt_text for p in bench.prompts]
    assert len(held_out) == 60 and len(set(held_out)) == 60  # distinct problems
    assert not seen & set(held_out)
    # the split is the question's alone: every held-out question hashes below the fraction
    assert all(split_of(p.answer[0].entry["question"], 0.1) == "test" for p in bench.prompts)
    assert all(split_of(p.answer[0].entry["question"], 0.1) == "train"
               for p in train.next_batch(200))


def test_seeds_change_the_training_order_not_the_benchmark(tokenizer) -> None:
    a, b = config(), config()
    b.trainer.seed = a.trainer.seed + 1
    first = [p.prompt_text for p in build_prompt_source(a, tokenizer).next_batch(20)]
    other = [p.prompt_text for p in build_prompt_source(b, tokenizer).next_batch(20)]
    again = [p.prompt_text for p in build_prompt_source(a, tokenizer).next_batch(20)]
    assert first == again and first != other
    # not one stream shifted by a problem (reasoning-gym's item i of seed s is Random(s + i))
    many = [{p.prompt_text for p in build_prompt_source(c, tokenizer).next_batch(200)}
            for c in (a, b)]
    assert len(many[0] & many[1]) < 100  # shifted: ~199; apart: 1-digit sums repeat (~35)
    bench_a = [p.prompt_text for p in load_benchmark(a, tokenizer, TASK).prompts]
    bench_b = [p.prompt_text for p in load_benchmark(b, tokenizer, TASK).prompts]
    assert bench_a == bench_b


def test_the_stream_resumes_from_its_state_and_evaluation_does_not_move_it(tokenizer) -> None:
    cfg = config()
    source = build_prompt_source(cfg, tokenizer)
    source.next_batch(7)
    state = source.state_dict()
    list(build_prompt_source(cfg, tokenizer, source=TASK, split="test"))
    expected = [p.prompt_text for p in source.next_batch(5)]
    resumed = build_prompt_source(cfg, tokenizer)
    resumed.load_state_dict(state)
    assert [p.prompt_text for p in resumed.next_batch(5)] == expected
    with pytest.raises(UserError, match="position"):
        resumed.load_state_dict({"position": -1})


def test_prompts_carry_the_chat_template_and_the_generator_options(tokenizer) -> None:
    item = build_prompt_source(config(), tokenizer).next_batch(1)[0]
    assert item.prompt_text.startswith("<|im_start|>user\n")
    assert item.prompt_text.endswith("<|im_start|>assistant\n")
    gold = item.answer[0]
    assert isinstance(gold, GymGold) and gold.options == OPTIONS["chain_sum"]
    assert len(gold.entry["metadata"]["expression"].split()) == 3  # two terms


def test_a_small_problem_space_gives_every_held_out_problem_once(tokenizer) -> None:
    """One-digit sums: 200 problems, ~20 held out; asking for 60 gives those and stops."""
    cfg = config(reasoning_gym={"chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                              "max_digits": 1}})
    held_out = [p.prompt_text for p in load_benchmark(cfg, tokenizer, TASK).prompts]
    assert 5 < len(held_out) < 60 and len(set(held_out)) == len(held_out)


def test_prompts_over_the_length_limit_are_skipped_and_counted(tokenizer) -> None:
    cfg = config(instruction="x " * 40)
    cfg.rollout.max_prompt_len = 30
    with pytest.raises(ConfigError, match="rollout.max_prompt_len"):
        build_prompt_source(cfg, tokenizer).next_batch(1)


@pytest.mark.parametrize(("response", "answer"), [
    ("The answer is 12.", "12"),
    ("3 + 9 = 12", "12"),
    ("So <answer>-7</answer> and then 5", "-7"),
    ("\\boxed{41} is it, not 40", "41"),
    ("1,234 apples", "1,234"),
    ("no number here", None),
    ("", None),
])  # fmt: skip
def test_the_answer_is_the_tag_else_the_box_else_the_last_number(response, answer) -> None:
    assert extract_answer(response) == answer


def test_the_reward_is_the_task_own_scorer(tokenizer) -> None:
    item = build_prompt_source(config(), tokenizer).next_batch(1)[0]
    gold = item.answer[0]
    right, wrong = str(gold), str(int(gold) + 1)
    rewards, metrics = gym_rewards(
        [f"It is {right}.<|im_end|>", f"It is {wrong}.", "I do not know", f"{right}.0"],
        [item.answer] * 4)
    assert rewards == [1.0, 0.0, 0.0, 1.0]  # chain_sum's scorer takes 12.0 for 12
    assert metrics["reward/no_answer"] == 0.25
    assert Rewards(config()).answer_of(f"so {right}") == right
    # a gold survives pickling (math-verify's worker pool, a checkpointed batch)
    assert pickle.loads(pickle.dumps(gold)).entry == gold.entry


def test_bad_input_is_one_line_naming_the_field(tokenizer) -> None:
    with pytest.raises(ConfigError, match="data.held_out_fraction"):
        config(held_out_fraction=1.0)
    with pytest.raises(ConfigError, match="data.reward=reasoning_gym scores"):
        config(eval=["toy:arithmetic"])
    with pytest.raises(UserError, match="unknown reasoning-gym task.*chain_sum"):
        check_paths(config(train="reasoning_gym:chain_sun"))
    with pytest.raises(ConfigError, match=r"data.reasoning_gym.chain_sum"):
        build_prompt_source(config(reasoning_gym={"chain_sum": {"min_terms": "two"}}),
                            tokenizer).next_batch(1)
    with pytest.raises(UserError, match="scores reasoning_gym:<task> data only"):
        gym_rewards(["1"], ["1"])
