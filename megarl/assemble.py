"""The parts of a run built from its config: tokenizer, prompt source, reward, rollout engine.

Each part is chosen by one config field (``model.tokenizer``, ``data.train``, ``data.reward``,
``rollout.engine``); heavy dependencies are imported only for the choice that needs them.
`check_paths` checks every file they will read, before any of them is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from megarl.config import Config
from megarl.data.gym import is_gym
from megarl.data.prompts import check_source, looks_like_path
from megarl.data.toy import ToySource, is_toy, leading_answer, toy_reward, toy_task, toy_tokenizer
from megarl.errors import ConfigError, UserError

RewardFn = Callable[[Sequence[str], Sequence[str]], tuple[list[float], dict[str, float]]]


def build_tokenizer(config: Config) -> Any:
    name = config.model.tokenizer or config.model.name_or_path
    if is_toy(name):
        return toy_tokenizer(name)
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise UserError(f"model.tokenizer={name!r}: cannot load a tokenizer ({e})") from None


def build_prompt_source(config: Config, tokenizer: Any, source: str | None = None,
                        split: str | None = None, *, shuffle: bool | None = None,
                        field: str = "data.train") -> Any:  # fmt: skip
    """The training prompts (or `source`'s): ``next_batch(n)``, ``state_dict()``.
    ``data.train_filter`` applies to the training prompts only."""
    where = config.data.train_filter if source is None else None
    source = source or config.data.train
    if is_toy(source):
        return ToySource(source, tokenizer, config.trainer.seed)
    if is_gym(source):
        from megarl.data.gym import gym_source

        return gym_source(source, tokenizer, config.data, split="test" if split == "test"
                          else "train", seed=config.trainer.seed, template=config.data.template,
                          max_prompt_len=config.rollout.max_prompt_len,
                          limit=config.eval.max_problems, field=field)
    from megarl.data.prompts import PromptDataset

    return PromptDataset(source, tokenizer, split=split or config.data.split,
                         prompt_key=config.data.prompt_key, answer_key=config.data.answer_key,
                         template=config.data.template, instruction=config.data.instruction,
                         max_prompt_len=config.rollout.max_prompt_len,
                         seed=config.trainer.seed,
                         shuffle=config.data.shuffle if shuffle is None else shuffle,
                         field=field, where=where)


class Rewards:
    """``data.reward``: ``exact`` (the toy tasks' leading-number match), ``math``
    (math-verify on the last ``\\boxed{}``, in a process pool) or ``reasoning_gym`` (the
    task's own scorer, `megarl.data.gym`)."""

    def __init__(self, config: Config) -> None:
        self.kind = config.data.reward
        self._verifier = None
        if self.kind == "math":
            from megarl.data.rewards import MathVerifier

            self._verifier = MathVerifier(workers=config.data.reward_workers)

    def __call__(self, responses: Sequence[str], answers: Sequence[str | Sequence[str]],
                 ) -> tuple[list[float], dict[str, float]]:  # fmt: skip
        if self._verifier is not None:
            return self._verifier.score(responses, answers)
        if self.kind == "reasoning_gym":
            from megarl.data.gym import gym_rewards

            return gym_rewards(responses, answers)
        return [toy_reward(r, a) for r, a in zip(responses, answers, strict=True)], {}

    def answer_of(self, response: str) -> str | None:
        """The answer a response commits to (for majority voting): the toy tasks' leading
        number, or the final answer the math reward grades (the last ``\\boxed{}``, else an
        ``Answer:`` line); None when there is none."""
        if self._verifier is not None:
            from megarl.data.answers import final_answer

            answer = final_answer(response)
            return None if answer is None else " ".join(answer.split())
        if self.kind == "reasoning_gym":
            from megarl.data.gym import extract_answer

            return extract_answer(response)
        return leading_answer(response)

    def close(self) -> None:
        if self._verifier is not None:
            self._verifier.close()


def build_engine(config: Config, hf_config: dict[str, Any], *, rank: int, world_size: int,
                 moe_layers: tuple[bool, ...], num_experts: int) -> Any:  # fmt: skip
    """The rollout engine, with weights that the first sync overwrites."""
    if config.rollout.engine == "vllm":
        from megarl.rollout.vllm import VLLMEngine, VLLMOptions

        model = config.model.name_or_path or engine_model_dir(hf_config)
        return VLLMEngine(model, VLLMOptions.from_config(config, seed=config.trainer.seed,
                                                         hf_config=hf_config),
                          moe_layers=moe_layers, num_experts=num_experts, hf_config=hf_config)
    import torch
    import transformers

    from megarl.rollout.hf import HFEngine

    hf = transformers.AutoConfig.for_model(**hf_config)
    model = transformers.AutoModelForCausalLM.from_config(hf, dtype=getattr(torch,
                                                                           config.model.dtype))
    return HFEngine(model)


def prepare_engine_platform(config: Config) -> None:
    """Process-wide set-up the rollout engine needs before anything imports Triton (megatron-core
    does): vLLM on the CPU with R3 runs its Triton kernels under Triton's interpreter
    (`megarl.rollout.vllm_cpu`), which must be chosen before ``triton.language`` loads."""
    if config.rollout.engine != "vllm" or config.model.replay_mode() != "r3":
        return
    import torch

    if not torch.cuda.is_available():
        from megarl.rollout import vllm_cpu

        vllm_cpu.install()


def engine_model_dir(hf_config: dict[str, Any]) -> str:
    """A model built from ``model.hf_config`` (no checkpoint) as a directory vLLM can build from:
    its ``config.json`` only, since the engine starts with dummy weights and the first sync
    writes every one. A temporary directory of this process, removed at exit."""
    import atexit
    import shutil
    import tempfile

    import transformers

    hf = transformers.AutoConfig.for_model(**hf_config)
    if not hf.architectures:
        hf.architectures = [transformers.AutoModelForCausalLM._model_mapping[type(hf)].__name__]
    path = tempfile.mkdtemp(prefix="megarl-engine-model-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    hf.save_pretrained(path)
    return path


def model_source(config: Config) -> tuple[dict[str, Any], Any]:
    """The HF config and the checkpoint to load (None: a model built from scratch)."""
    path = model_dir(config)
    if path is None:
        return dict(config.model.hf_config), None
    from megarl.convert.hf_io import HFCheckpoint

    checkpoint = HFCheckpoint(path)
    hf_config = dict(checkpoint.config) | dict(config.model.hf_config)
    return hf_config, (None if config.model.random_init else checkpoint)


# --------------------------------------------------------------------------------------------
# The files a run reads, checked up front
# --------------------------------------------------------------------------------------------

RESUME_KEYWORDS = ("auto", "never")
# Files one of which AutoTokenizer needs in a local tokenizer directory.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "vocab.txt", "spiece.model")


def eval_checkpoint_dir(checkpoint: str | Path) -> Path:
    """``megarl eval --checkpoint``'s directory, or a one-line UserError."""
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise UserError(f"checkpoint {checkpoint}: not a directory (give a run directory, "
                        "one of its checkpoints/step_* or an HF checkpoint directory)")
    return path


def check_paths(config: Config, *, evaluation: bool = False,
                checkpoint: str | None = None) -> None:  # fmt: skip
    """The files `megarl train` will read, checked before anything is built (and by ``megarl
    plan``): the checkpoint ``model.name_or_path``, the tokenizer, ``data.train``, ``data.eval``
    when the run evaluates (a hub dataset name passes: it is loaded or downloaded at start),
    and ``checkpoint.resume`` when it is a path. Raises a one-line `UserError` naming the field.

    ``evaluation``: what `megarl eval` reads instead (no ``data.train``, no resume), with its
    ``--checkpoint``, which replaces ``model.name_or_path`` when it is an HF directory.
    """
    replaced = False
    if checkpoint is not None:
        replaced = (eval_checkpoint_dir(checkpoint) / "config.json").is_file()
    if not replaced:
        model_dir(config)
    _check_tokenizer(config)
    if not evaluation:
        _check_data(config.data.train, "data.train")
    if evaluation or config.trainer.eval_every or config.trainer.eval_before_train:
        for entry in config.data.eval:
            _check_data(entry if is_toy(entry) or is_gym(entry) else split_source(entry)[0],
                        "data.eval")
    if not evaluation:
        _check_resume(config.checkpoint.resume)


def model_dir(config: Config) -> Path | None:
    """The local HF checkpoint directory ``model.name_or_path`` (None: a model built from
    ``model.hf_config``); it holds ``config.json`` and, unless ``random_init``, the weights."""
    name = config.model.name_or_path
    if name is None:
        return None
    path = Path(name).expanduser()
    field = "model.name_or_path"
    if path.is_file():
        raise ConfigError(field, name, "is a file: give the checkpoint's directory")
    if not path.is_dir():
        if looks_like_path(name):
            raise ConfigError(field, name, "no such directory: give a local HF checkpoint "
                              "directory (config.json and *.safetensors)")
        raise ConfigError(field, name, "not a local checkpoint directory: download it "
                          f"(huggingface-cli download {name} --local-dir DIR) and set "
                          "model.name_or_path=DIR")
    if not (path / "config.json").is_file():
        raise ConfigError(field, name, "no config.json in it: give an HF checkpoint directory")
    if not config.model.random_init and not any(path.glob("*.safetensors*")):
        raise ConfigError(field, name, "no *.safetensors weights in it (set "
                          "model.random_init=true to start from random weights)")
    return path


def split_source(entry: str) -> tuple[str, str]:
    """A ``data.eval`` entry ``"SOURCE@SPLIT"`` -> (source, split); the split defaults to
    ``test``."""
    source, _, split = entry.partition("@")
    return source, split or "test"


def _check_tokenizer(config: Config) -> None:
    field = "model.tokenizer" if config.model.tokenizer else "model.name_or_path"
    name = config.model.tokenizer or config.model.name_or_path
    if name is None:  # Config.validate refuses this
        return
    if is_toy(name):
        toy_task(name, field)
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise ConfigError(field, name, "holds no tokenizer (tokenizer.json or "
                              "tokenizer_config.json): give a tokenizer directory")
    elif path.exists():
        raise ConfigError(field, name, "is a file: give the tokenizer's directory")
    elif looks_like_path(name):
        raise ConfigError(field, name, "no such directory: give a tokenizer directory or an "
                          "HF hub name")
    # else a hub name: transformers loads it from its cache (or the hub) at start


def _check_data(source: str, field: str) -> None:
    if is_toy(source):
        toy_task(source, field)
    elif is_gym(source):
        from megarl.data.gym import gym_task

        gym_task(source, field)
    else:
        check_source(source, field)


def _check_resume(resume: str) -> None:
    if resume in RESUME_KEYWORDS:
        return
    path = Path(resume).expanduser()
    allowed = "give a step_* checkpoint directory, 'auto' (the newest in checkpoint.dir) or " \
              "'never'"
    if not path.is_dir():
        raise ConfigError("checkpoint.resume", resume, f"no such directory: {allowed}")
    from megarl.run_checkpoints import COMPLETE

    if not (path / COMPLETE).is_file():
        raise ConfigError("checkpoint.resume", resume, f"not a complete megarl checkpoint "
                          f"(no {COMPLETE} file in it): {allowed}")
