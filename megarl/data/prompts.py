"""Prompt datasets for RL: load, map fields, render, filter by length, shuffle resumably.

A :class:`PromptDataset` reads rows through the ``datasets`` library from a hub name, a
``save_to_disk`` folder (a ``Dataset``, a ``DatasetDict`` plus a split, or one split's folder)
or a ``.jsonl`` / ``.json`` / ``.parquet`` file, and serves :class:`PromptItem` batches.

Tokenisation: one batched pass at construction counts every prompt's tokens (the length filter
and ``num_dropped`` need them all; the pass also checks every gold answer) and keeps only the
counts, an int32 per row; a batch's ids are tokenised again when it is served. Rendering and
tokenising are deterministic, so the ids are the ones that were counted, and memory stays flat
for large sets (the hub's DAPO-Math-17k repeats its 17k prompts to about 1.8M rows).

Order: epoch ``e`` visits the kept rows in the permutation drawn from
``numpy.random.default_rng([seed, e])`` — no global RNG — so ``(epoch, position)`` is the whole
state, and a dataset restored from :meth:`PromptDataset.state_dict` yields the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from megarl.data.answers import gold_answers
from megarl.data.formats import DatasetFormat, find_format, get_format
from megarl.errors import ConfigError, UserError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

Template = Literal["chat", "plain"]

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_COUNT_CHUNK = 1024  # rows rendered and tokenised together in the counting pass


@dataclass(frozen=True)
class PromptItem:
    """One prompt ready for rollout: ``index`` is its row in the source dataset.

    The fields the trainer reads have the names of the toy tasks' `~megarl.data.toy.Prompt`,
    so either source serves it. ``answer`` holds every accepted gold answer, normalised, the
    canonical one first (Minerva lists alternative forms); `MathVerifier` accepts any of them.
    """

    index: int
    prompt_ids: list[int]
    prompt_text: str
    answer: tuple[str, ...]
    dataset: str


class PromptDataset:
    """Prompts with gold answers, served in resumable, per-epoch shuffled batches.

    ``prompt_key`` / ``answer_key`` default to the known format's keys (see
    :mod:`megarl.data.formats`), else ``problem`` / ``answer``; dotted keys reach into nested
    columns and a chat-list prompt contributes its last user message. ``instruction`` is
    appended to each prompt on a new line: None means the format's default, ``""`` none.
    ``template="chat"`` wraps the prompt in the tokenizer's chat template with the generation
    prompt; ``"plain"`` tokenises the text as is, with the tokenizer's special tokens (BOS).
    Prompts longer than ``max_prompt_len`` tokens are dropped and counted in ``num_dropped``.
    ``format`` names a known format when the source's name does not tell it; ``field`` names
    the config field the source came from, for error messages. ``where`` (``data.train_filter``)
    keeps only the rows whose column holds one of the listed values; ``index`` then counts rows
    of the filtered dataset.
    """

    def __init__(
        self,
        source: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        split: str = "train",
        prompt_key: str | None = None,
        answer_key: str | None = None,
        template: Template = "chat",
        max_prompt_len: int,
        seed: int,
        shuffle: bool = True,
        instruction: str | None = None,
        format: str | None = None,
        field: str = "data.train",
        where: Mapping[str, Sequence[Any]] | None = None,
    ) -> None:
        if template not in ("chat", "plain"):
            raise ConfigError("data.template", template, "must be 'chat' or 'plain'")
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.template", "chat",
                              "the tokenizer has no chat template; use data.template=plain")
        if not isinstance(max_prompt_len, int) or max_prompt_len < 1:
            raise ConfigError("rollout.max_prompt_len", max_prompt_len, "must be an int >= 1")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError("trainer.seed", seed, "must be an int >= 0")

        fmt = get_format(format) if format else find_format(source, split)
        self.source, self.split, self.format = source, split, fmt
        self.name = fmt.name if fmt else _short_name(source)
        self.tokenizer, self.template = tokenizer, template
        self.max_prompt_len, self.seed, self.shuffle = max_prompt_len, seed, shuffle
        self.prompt_key = prompt_key or (fmt.prompt_key if fmt else "problem")
        self.answer_key = answer_key or (fmt.answer_key if fmt else "answer")
        default_instruction = fmt.instruction if fmt else None
        self.instruction = default_instruction if instruction is None else (instruction or None)
        # A format's gold reader fits its own answer column only (MATH's reads a solution).
        own_answers = fmt is not None and self.answer_key == fmt.answer_key
        self._gold = fmt.gold if own_answers else gold_answers

        rows = load_rows(source, split, field=field, fmt=fmt)
        check_key(rows, self.prompt_key, "data.prompt_key", source)
        check_key(rows, self.answer_key, "data.answer_key", source)
        if where:
            rows = filter_rows(rows, where, source)
        tops = {_top(rows, self.prompt_key), _top(rows, self.answer_key)}
        self._rows = rows.select_columns(sorted(tops))

        self.lengths = self._count_tokens()
        self._kept = np.flatnonzero(self.lengths <= max_prompt_len)
        self.num_dropped = len(self.lengths) - len(self._kept)
        if len(self.lengths) == 0:
            raise ConfigError(field, source, f"has no rows in split {split!r}")
        if len(self._kept) == 0:
            raise ConfigError(
                "rollout.max_prompt_len", max_prompt_len,
                f"drops all {len(self.lengths)} prompts of {source} (shortest "
                f"{int(self.lengths.min())} tokens); raise it",
            )
        self._epoch, self._position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    # ---- size and order ------------------------------------------------------------------

    def __len__(self) -> int:
        """Prompts kept by the length filter (one epoch)."""
        return len(self._kept)

    @property
    def num_rows(self) -> int:
        """Rows in the source, before the length filter."""
        return len(self.lengths)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Source row indices in the order epoch ``epoch`` visits them."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        order = self._kept
        if self.shuffle:
            order = self._kept[np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        self._order = (epoch, order)
        return order

    # ---- serving -------------------------------------------------------------------------

    def next_batch(self, n: int) -> list[PromptItem]:
        """The next ``n`` prompts, continuing into the next epoch's order when one ends."""
        if n < 0:
            raise ValueError(f"batch size must be >= 0, got {n}")
        indices: list[int] = []
        while len(indices) < n:
            order = self.epoch_order(self._epoch)
            take = order[self._position : self._position + n - len(indices)]
            indices += take.tolist()
            self._position += len(take)
            if self._position == len(order):
                self._epoch, self._position = self._epoch + 1, 0
        return self.items(indices)

    def items(self, indices: list[int]) -> list[PromptItem]:
        """Prompts for source rows ``indices`` (rendered, tokenised, gold normalised)."""
        rows = [self._rows[int(i)] for i in indices]
        texts = [self.render(self._prompt(row)) for row in rows]
        ids = self._tokenise(texts) if texts else []
        return [
            PromptItem(int(i), list(t), text, self._answer(int(i), row), self.name)
            for i, row, text, t in zip(indices, rows, texts, ids, strict=True)
        ]

    def __iter__(self) -> Iterator[PromptItem]:
        """All kept prompts once, in source order (for evaluation); does not move the state."""
        for start in range(0, len(self._kept), _COUNT_CHUNK):
            yield from self.items(self._kept[start : start + _COUNT_CHUNK].tolist())

    def render(self, text: str) -> str:
        """The prompt text the policy sees: instruction appended, chat template applied."""
        return render_prompt(self.tokenizer, self.template, self.instruction, text)

    # ---- resumption ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at a saved ``(epoch, position)``; the dataset must be the one it was saved on."""
        epoch, position = state.get("epoch"), state.get("position")
        for key, value in (("epoch", epoch), ("position", position)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"data state {key}={value!r}: expected an int >= 0 "
                                "(the checkpoint's data state is damaged)")
        if position > len(self):
            raise UserError(
                f"data state position={position} is beyond this dataset's {len(self)} prompts: "
                "was data.train or rollout.max_prompt_len changed since the checkpoint?"
            )
        self._epoch, self._position = (epoch + 1, 0) if position == len(self) else (epoch, position)

    # ---- internals -----------------------------------------------------------------------

    def _prompt(self, row: Mapping[str, Any]) -> str:
        return prompt_text(_get(row, self.prompt_key), self.prompt_key)

    def _answer(self, index: int, row: Mapping[str, Any]) -> tuple[str, ...]:
        try:
            return self._gold(_get(row, self.answer_key))
        except UserError as e:
            raise UserError(f"data.answer_key={self.answer_key!r}: row {index} of "
                            f"{self.source}: {e}") from None

    def _tokenise(self, texts: list[str]) -> list[list[int]]:
        return tokenise(self.tokenizer, self.template, texts)

    def _count_tokens(self) -> np.ndarray:
        """Token counts of every row; also checks every gold answer, so bad rows fail now."""
        counts: list[int] = []
        for batch in self._rows.iter(batch_size=_COUNT_CHUNK):
            rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(),
                                                                           strict=True)]
            for offset, row in enumerate(rows):
                self._answer(len(counts) + offset, row)
            texts = [self.render(self._prompt(row)) for row in rows]
            counts += [len(ids) for ids in self._tokenise(texts)]
        return np.asarray(counts, dtype=np.int32)


def render_prompt(tokenizer: Any, template: str, instruction: str | None, text: str) -> str:
    """The prompt text the policy sees: ``instruction`` appended on a new line, then the
    tokenizer's chat template with the generation prompt (``template="chat"``) or nothing."""
    if instruction:
        text = f"{text}\n{instruction}"
    if template == "plain":
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def tokenise(tokenizer: Any, template: str, texts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts: a chat template writes its own special tokens (as
    apply_chat_template does), plain text gets the tokenizer's (BOS)."""
    return tokenizer(texts, add_special_tokens=template == "plain")["input_ids"]


# --------------------------------------------------------------------------------------------
# Loading and field mapping
# --------------------------------------------------------------------------------------------


def load_rows(
    source: str, split: str = "train", *, field: str = "data.train",
    fmt: DatasetFormat | None = None,
) -> datasets.Dataset:
    """The rows of ``source``: a hub name, a save_to_disk folder or a json/jsonl/parquet file.

    ``split`` picks a DatasetDict's split or the hub split; a single ``Dataset`` folder and a
    file have one split and ignore it.
    """
    import datasets

    check_source(source, field)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = datasets.load_from_disk(str(path))
            if split not in splits:
                raise ConfigError("data.split", split,
                                  f"not a split of {source}; splits: {', '.join(splits)}")
            return splits[split]
        if (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        return _load(field, source, lambda: datasets.load_dataset(str(path), split=split))
    if path.is_file():
        builder = _FILE_BUILDERS[path.suffix.lower()]
        return _load(field, source, lambda: datasets.load_dataset(
            builder, data_files=str(path), split="train"))
    config = fmt.hub_config if fmt else None
    return _load(field, source, lambda: datasets.load_dataset(source, config, split=split))


def check_source(source: str, field: str = "data.train") -> None:
    """What can be told of ``source`` without loading it (`load_rows` and ``megarl plan``): a
    file is of a supported type and not empty, a path that cannot be a hub name exists. A hub
    name passes: whether it downloads is known only when it is loaded."""
    path = Path(source).expanduser()
    if path.is_dir():
        return
    if path.is_file():
        if path.suffix.lower() not in _FILE_BUILDERS:
            raise ConfigError(field, source, "unsupported file type; use .jsonl, .json, "
                              ".parquet or a save_to_disk folder")
        if path.stat().st_size == 0:
            raise ConfigError(field, source, "the file is empty")
        return
    if looks_like_path(source):
        raise ConfigError(field, source, "no such file or directory; give an existing path "
                          "or a Hugging Face hub name")


def check_key(rows: datasets.Dataset, key: str, field: str, source: str) -> None:
    """ConfigError naming ``field`` and the columns (or nested keys) that do exist."""
    if key in rows.column_names:
        return
    node: Any = rows.features
    seen: list[str] = []
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if not seen:
                have = f"columns: {', '.join(rows.column_names)}"
            elif isinstance(node, Mapping):
                have = f"keys of {'.'.join(seen)}: {', '.join(node)}"
            else:
                have = f"{'.'.join(seen)} is not a mapping"
            raise ConfigError(field, key, f"not found in {source} ({have}); set {field}")
        node = node[part]
        seen.append(part)


def filter_rows(rows: datasets.Dataset, where: Mapping[str, Sequence[Any]],
                source: str) -> datasets.Dataset:
    """The rows whose column ``key`` holds one of ``where[key]``, for every key
    (``data.train_filter``); ConfigError when a column is missing or nothing is left."""
    for key in where:
        check_key(rows, key, "data.train_filter", source)
    allowed = {key: list(values) for key, values in where.items()}
    tops = sorted({_top(rows, key) for key in where})

    def wanted(*columns: Any) -> bool:
        row = dict(zip(tops, columns, strict=True))
        return all(_get(row, key) in values for key, values in allowed.items())

    # in memory: a cache file next to a read-only dataset on disk could not be written
    kept = rows.filter(wanted, input_columns=tops, keep_in_memory=True)
    if len(kept) == 0:
        raise ConfigError("data.train_filter", dict(where),
                          f"keeps none of the {len(rows)} rows of {source}")
    return kept


def prompt_text(value: Any, key: str = "prompt") -> str:
    """A prompt column's text: a string, or the last user message of a chat list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, Mapping) for m in value):
        users = [m for m in value if m.get("role") == "user"]
        if users and isinstance(users[-1].get("content"), str):
            return users[-1]["content"]
    raise ConfigError("data.prompt_key", key, f"holds {type(value).__name__} values, not text "
                      "or a chat list with a user message; point it at the prompt text")


def _get(row: Mapping[str, Any], key: str) -> Any:
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        value = value[part]
    return value


def _top(rows: datasets.Dataset, key: str) -> str:
    return key if key in rows.column_names else key.split(".", 1)[0]


def _load(field: str, source: str, load: Any) -> datasets.Dataset:
    from datasets.exceptions import DatasetsError

    try:
        return load()
    # ConnectionError, DatasetNotFoundError, a bad split, a malformed file
    except (OSError, ValueError, DatasetsError) as e:
        cause: BaseException = e
        while cause.__cause__ is not None:  # "error while generating" hides the parse error
            cause = cause.__cause__
        reason = " ".join(str(cause).split())[:300] or type(cause).__name__
        raise UserError(f"{field}={source!r}: cannot load: {reason}") from None


def looks_like_path(source: str) -> bool:
    """A local path, never a hub name (``org/name``): absolute, relative, or a data file."""
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or Path(source).suffix.lower() in _FILE_BUILDERS
    )


def _short_name(source: str) -> str:
    return Path(source.rstrip("/")).stem or source
