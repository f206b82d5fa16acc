"""``megarl plan``: a readable summary of the run a validated config describes."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from megarl.config import Config
from megarl.convert.mapping import SUPPORTED, Architecture
from megarl.memory_model import count_params, estimate_memory

Section = tuple[str, list[tuple[str, str]]]


def plan_sections(config: Config, *, paths_checked: bool | None = None) -> list[Section]:
    """The plan as (section title, [(label, value)]) rows; pure, for printing and tests.
    ``paths_checked``: whether `megarl.assemble.check_paths` passed (None: not said)."""
    return [
        ("Model", _model(config)),
        *_parameters(config),
        ("Layout", _layout(config)),
        *_memory(config),
        ("Objective", _objective(config)),
        ("Batches", _batches(config)),
        ("Rollout", _rollout(config)),
        ("Data and logging", _data(config, paths_checked)),
    ]


def print_plan(config: Config, console: Console | None = None, *,
               paths_checked: bool | None = None) -> None:  # fmt: skip
    """Print the plan as one table, a section per concern."""
    console = console or Console()
    table = Table(title="megarl plan", title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for i, (title, rows) in enumerate(plan_sections(config, paths_checked=paths_checked)):
        if i:
            table.add_section()
        table.add_row(f"[bold magenta]{title}[/]", "")
        for label, value in rows:
            table.add_row(f"  {label}", escape(value))
    console.print(table)


def _model(c: Config) -> list[tuple[str, str]]:
    m, f = c.model, c.model.facts()
    hf = m.known_config()
    source = m.name_or_path or "inline model.hf_config"
    rows = [("source", source + (" (random init)" if m.random_init else ""))]
    rows.append(("architecture", str(hf.get("model_type", "unknown until loaded"))))
    if f.num_layers is not None:
        rows.append(("layers / hidden", f"{f.num_layers} / {_opt(f.hidden_size)}"))
    if f.num_attention_heads is not None:
        rows.append(("heads / KV heads", f"{f.num_attention_heads} / {f.num_query_groups}"))
    if f.num_experts:
        rows.append(("experts / top-k", f"{f.num_experts} / {_opt(f.moe_router_topk)}"))
    if f.vocab_size is not None:
        rows.append(("vocab", str(f.vocab_size)))
    rows.append(("tokenizer", m.tokenizer or source))
    rows.append(("dtype", m.dtype))
    mode = m.replay_mode(f)
    described = {"r3": "R3 (the rollout engine's routes)",
                 "r2": "R2 (Megatron's own routes from the old-log-prob pass)", "off": "off"}
    replay = described[mode]
    if m.routing_replay is None and f.is_moe is None:
        replay += " if MoE"
    rows.append(("routing replay", replay))
    return rows


def _layout(c: Config) -> list[tuple[str, str]]:
    p = c.parallel
    dp = p.data_parallel_size()
    world = p.world_size if p.world_size is not None else (None if dp is None else
                                                           p.tp * p.pp * p.cp * dp)
    dims = f"TP={p.tp} PP={p.pp} CP={p.cp} DP={_opt(dp, 'world/(tp*pp*cp)')}"
    if p.vpp:
        dims += f" VPP={p.vpp}"
    rows = [
        ("dense", dims),
        ("experts", f"EP={p.ep} ETP={p.expert_tp}" + (
            f" EDP={world // (p.pp * p.ep * p.expert_tp)}" if world else "")),
        ("world size", _opt(world, "from the launcher")),
        ("sequence parallel", _onoff(p.use_sequence_parallel)),
    ]
    layout = p.resolved()
    if layout is None:
        return rows
    for axis in ("tp", "cp", "dp", "pp", "ep", "etp", "edp"):
        rows.append((f"rank 0's {axis.upper()} group", _ranks(layout.group_of(axis, 0))))
    arch = _architecture(c)
    if arch is None:
        return rows
    for stage, layers in enumerate(layout.stage_layers(arch.num_layers)):
        per_stage = layout.world_size // layout.pp  # pp is the slowest axis: a contiguous block
        first = stage * per_stage
        rows.append((f"PP stage {stage}", f"decoder layers {_spans(layers)} on ranks "
                                          f"{first}-{first + per_stage - 1}"))
    if arch.num_experts:
        ep_groups = layout.groups("ep")
        for r, experts in enumerate(layout.expert_ranges(arch.num_experts)):
            holders = [g[r] for g in ep_groups]
            rows.append((f"EP rank {r}", f"experts {experts.start}-{experts.stop - 1} "
                                         f"on ranks {_ranks(holders)}"))
    return rows


def _architecture(c: Config) -> Architecture | None:
    hf = c.model.known_config()
    return Architecture.from_hf(hf) if hf.get("model_type") in SUPPORTED else None


def _parameters(c: Config) -> list[Section]:
    if _architecture(c) is None:
        return []
    n = count_params(c.model.known_config())
    rows = [
        ("total", f"{_count(n.total)} ({n.total:,})"),
        ("non-embedding", f"{_count(n.non_embedding)} (without embedding and lm head)"),
    ]
    if n.top_k:
        rows.append(("active per token", f"{_count(n.active)} (top-{n.top_k} experts and all "
                                         "shared weights, both embedding tables)"))
        rows.append(("active, excl. input embedding", _count(n.active_compute)))
        rows.append(("routed experts", _count(n.experts)))
    return [("Parameters", rows)]


def _memory(c: Config) -> list[Section]:
    if _architecture(c) is None or c.parallel.world_size is None:
        return []
    m = estimate_memory(c)
    title = "Memory per GPU (GiB)" + (f", PP stage {m.stage}" if c.parallel.pp > 1 else "")
    rows = [(x.label, f"{x.gib:6.2f}  {x.formula}") for x in m.lines]
    rows.append(("vLLM KV cache capacity",
                 f"{m.kv_cache_tokens:,} tokens = {m.kv_cache_sequences:.1f} full-length "
                 "sequences per engine"))
    for b in m.budgets:
        rows.append((f"{b.name} peak", f"{b.gib:6.2f} of {b.limit_gib:g}: {b.parts}"))
    rows.append(("verdict", m.verdict()))
    return [(title, rows)]


def _objective(c: Config) -> list[tuple[str, str]]:
    a, objective = c.algo, c.objective()
    agg = objective.agg + (" (the loss's default)" if a.agg is None else "")
    kl = f"beta={objective.kl_beta:g} ({objective.kl_type})" if objective.kl_beta else "off"
    return [
        ("policy loss", f"{objective.name}: {objective.spec.summary}"),
        ("level", objective.spec.level),
        ("hyperparameters", _kv(dict(objective.params))),
        ("aggregation", agg),
        ("advantage", a.advantage),
        ("KL penalty", kl),
        ("entropy bonus", f"{objective.entropy_coef:g}" if objective.entropy_coef else "off"),
        ("rollout correction", _correction(objective)),
        ("dynamic sampling", _onoff(a.dynamic_sampling) + (
            f" (at most {a.max_sampling_rounds} rounds)" if a.dynamic_sampling else "")),
        ("old log-probs", a.old_logprobs),
    ]


def _correction(objective) -> str:
    rc = objective.rollout_correction
    if rc is None:
        return "off"
    bounds = (f"ratio truncated at {rc.upper:g}" if rc.lower is None
              else f"kept in [{rc.lower:g}, {rc.upper:g}]")
    return f"{rc.mode}: {bounds} (engine vs recomputed old log-probs)"


def _batches(c: Config) -> list[tuple[str, str]]:
    t = c.trainer
    dp = c.parallel.data_parallel_size()
    rows = [
        ("steps", str(t.steps)),
        ("prompts / step", str(t.prompts_per_step)),
        ("samples / prompt", str(c.rollout.n_samples)),
        ("sequences / step", str(c.sequences_per_step)),
        ("mini-batch (sequences)", f"{t.mini_batch_size} -> {c.mini_batches_per_epoch} per epoch"),
        ("epochs", str(t.epochs)),
        ("optimizer updates / step", str(c.updates_per_step)),
    ]
    if t.max_tokens_per_micro_batch is not None:
        rows.append(("micro-batch (per GPU)", _token_budget(c)))
    elif dp is not None:
        per_rank = t.mini_batch_size // dp
        rows.append(("micro-batch (per DP rank)",
                     f"{t.micro_batch_size} -> {per_rank // t.micro_batch_size} per mini-batch"))
    else:
        rows.append(("micro-batch (per DP rank)", str(t.micro_batch_size)))
    rows.append(("lr", f"{t.lr:g} ({t.lr_schedule}, warmup {t.lr_warmup_steps})"))
    rows.append(("seed", str(t.seed)))
    return rows


def _token_budget(c: Config) -> str:
    """The token budget, the row it allows, and what happens to a longer sequence."""
    t, p, r = c.trainer, c.parallel, c.rollout
    budget = t.max_tokens_per_micro_batch
    row = c.micro_batch_row_tokens
    seq = r.max_prompt_len + r.max_response_len
    text = f"<= {budget} tokens (packed, DP-balanced by tokens; micro_batch_size unused)"
    if p.cp > 1:
        text += f"; rows of <= {budget * p.cp} tokens over cp={p.cp}"
    if row is not None and seq > budget * p.cp:
        text += f"; a {seq}-token sequence travels alone (row {row})"
    return text


def _rollout(c: Config) -> list[tuple[str, str]]:
    r = c.rollout
    return [
        ("engine", r.engine + (f" (tp={r.tp})" if r.engine == "vllm" else "")),
        ("sampling", f"temperature={r.temperature:g} top_p={r.top_p:g} "
                     f"top_k={'off' if r.top_k == -1 else r.top_k}"),
        ("lengths", f"prompt <= {r.max_prompt_len}, response <= {r.max_response_len}"),
    ]


def _data(c: Config, paths_checked: bool | None = None) -> list[tuple[str, str]]:
    d, lg = c.data, c.logging
    kept = "; ".join(f"{k} in {v}" for k, v in d.train_filter.items())
    rows = [
        ("train data", d.train + (f" (rows with {kept})" if kept else "")),
        ("eval data", ", ".join(d.eval) or "none"),
        ("reward", d.reward),
        ("metrics", ", ".join(lg.sinks) or "none"),
        ("run dir", f"{lg.dir}/{lg.run_name or '<timestamp>'}"),
        ("resume", c.checkpoint.resume),
    ]
    if paths_checked is not None:
        rows.append(("paths", "model, tokenizer, data and resume checked on this machine "
                     "(hub names load at start)" if paths_checked
                     else "not checked (--skip-path-checks)"))
    return rows


def _kv(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "none"


def _count(n: int) -> str:
    """Parameters in B (1e9), M or K, three decimals."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return str(n)


def _ranks(ranks: list[int], limit: int = 8) -> str:
    if len(ranks) <= limit:
        return "[" + ", ".join(map(str, ranks)) + "]"
    return "[" + ", ".join(map(str, ranks[:limit - 2])) + f", ..., {ranks[-1]}] ({len(ranks)})"


def _spans(layers: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0-2, 5-6'."""
    spans: list[list[int]] = []
    for x in layers:
        if spans and x == spans[-1][1] + 1:
            spans[-1][1] = x
        else:
            spans.append([x, x])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)


def _opt(value: object, missing: str = "?") -> str:
    return missing if value is None else str(value)


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"
