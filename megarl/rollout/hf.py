"""The embedded rollout engine on transformers (CPU or one GPU): the quickstart's and the tests'.

It honours vLLM's contract (`megarl.rollout.engine`): batched sampling with temperature /
top-p / top-k / max tokens / stop tokens, the log-prob of each sampled token under the sampling
temperature (before top-k / top-p, as the trainer computes it), and for MoE models the top-k
expert ids of every router for every token fed forward, captured by a forward hook on each
router module (the ids the model actually used).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megarl.errors import UserError
from megarl.rollout.engine import (
    NonFiniteRollout,
    Rollout,
    RolloutBatch,
    SamplingParams,
    route_dtype,
)

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


class HFEngine:
    """A transformers causal LM as a `RolloutEngine`."""

    def __init__(self, model: Any, *, dtype: str = "float32", device: str | None = None,
                 max_batch: int = 256) -> None:  # fmt: skip
        import transformers

        self.max_batch = max_batch
        if isinstance(model, str | Path):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                model, dtype=getattr(torch, dtype)
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.config = self.model.config
        self.routers = [m for _, m in self.model.named_modules() if _is_router(m)]
        self.num_experts = int(self.routers[0].num_experts) if self.routers else 0
        self._captured: list[Tensor] = []
        for router in self.routers:
            router.register_forward_hook(self._capture)
        self._params = dict(self.model.named_parameters())
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        self.eos_token_ids = tuple([eos] if isinstance(eos, int) else (eos or []))

    def _capture(self, module: Any, args: Any, output: Any) -> None:
        self._captured.append(output[2])  # (logits, scores, top-k indices [tokens, k])

    def _take_routes(self, batch: int, length: int) -> Tensor | None:
        """``[batch, length, moe_layers, topk]`` of the forward that just ran."""
        if not self.routers:
            return None
        layers, self._captured = self._captured, []
        if len(layers) != len(self.routers):
            raise RuntimeError(f"captured {len(layers)} router outputs, expected "
                               f"{len(self.routers)}")
        return torch.stack([r.reshape(batch, length, -1) for r in layers], dim=2)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> RolloutBatch:
        """Up to `max_batch` sequences decode together (an evaluation's problems x k samples
        would otherwise hold every KV cache and logit row at once); one seeded generator
        runs through the chunks, so a call is repeatable whatever its size."""
        sampling.check()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("generate: every prompt needs at least one token")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else
                              int(torch.randint(0, 2**62, ()).item()))
        rollouts: list[Rollout] = []
        for start in range(0, len(prompts), self.max_batch):
            rollouts += self._generate(prompts[start:start + self.max_batch], sampling,
                                       generator)
        return RolloutBatch(rollouts)

    def _generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                  generator: torch.Generator) -> list[Rollout]:  # fmt: skip
        from transformers import DynamicCache

        b, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(b, width, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row ends at the same column
            ids[i, width - len(p):] = torch.as_tensor(list(p))
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        stop = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else
                                               set(self.eos_token_ids))
        self._captured = []
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=DynamicCache(config=self.config), use_cache=True)
        prompt_routes = self._take_routes(b, width)
        step_routes: list[Tensor] = []
        tokens: list[list[int]] = [[] for _ in range(b)]
        logps: list[list[float]] = [[] for _ in range(b)]
        finish: list[str | None] = [None] * b
        logits, cache, last = out.logits[:, -1], out.past_key_values, positions[:, -1]
        for step in range(sampling.max_tokens):
            token, logp = _sample(logits, sampling, generator)
            for i in range(b):
                if finish[i] is None:
                    tokens[i].append(int(token[i]))
                    logps[i].append(float(logp[i]))
                    if int(token[i]) in stop:
                        finish[i] = "stop"
            if all(f is not None for f in finish) or step == sampling.max_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            last = last + 1
            out = self.model(input_ids=token[:, None], attention_mask=mask,
                             position_ids=last[:, None], past_key_values=cache, use_cache=True)
            step_routes.append(self._take_routes(b, 1))
            logits, cache = out.logits[:, -1], out.past_key_values
        rollouts = []
        for i, p in enumerate(prompts):
            routes = None
            if prompt_routes is not None:  # prompt rows, then the response tokens fed forward
                fed = [prompt_routes[i, width - len(p):]] + \
                    [r[i] for r in step_routes[: len(tokens[i]) - 1]]
                routes = torch.cat(fed).to("cpu", route_dtype(self.num_experts))
            rollouts.append(Rollout(
                prompt_ids=torch.as_tensor(list(p), dtype=torch.long),
                response_ids=torch.tensor(tokens[i], dtype=torch.long),
                logprobs=torch.tensor(logps[i], dtype=torch.float32),
                finish_reason=finish[i] or "length", routed_experts=routes,
            ))  # fmt: skip
        return rollouts

    @torch.no_grad()
    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> int:
        """Copy HF-named (on-disk names) tensors into the model; unknown names fail."""
        loaded = 0
        for name, tensor in weights:
            target = self._slot(name)
            if target.shape != tensor.shape:
                raise UserError(f"update_weights: {name} has shape {tuple(tensor.shape)}, the "
                                f"engine's is {tuple(target.shape)}")
            target.copy_(tensor)
            loaded += tensor.numel() * tensor.element_size()
        return loaded

    def hf_tensors(self) -> Iterable[tuple[str, Tensor]]:
        """The engine's weights under on-disk HF names (per-expert), for checks."""
        for name, param in self._params.items():
            match = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$",
                             name)
            if match is None:
                yield name, param.detach()
                continue
            for j in range(param.shape[0]):
                if match.group(2) == "down_proj":
                    yield f"{match.group(1)}.{j}.down_proj.weight", param[j].detach()
                else:
                    gate, up = param[j].detach().chunk(2, dim=0)
                    yield f"{match.group(1)}.{j}.gate_proj.weight", gate
                    yield f"{match.group(1)}.{j}.up_proj.weight", up

    def _slot(self, name: str) -> Tensor:
        """The engine tensor (a parameter or a view of a fused one) an HF name loads into."""
        if name in self._params:
            return self._params[name].data
        match = _EXPERT.match(name)
        if match:
            prefix, j, which = match.group(1), int(match.group(2)), match.group(3)
            if which == "down":
                return self._params[f"{prefix}.down_proj"].data[j]
            gate_up = self._params[f"{prefix}.gate_up_proj"].data[j]
            half = gate_up.shape[0] // 2
            return gate_up[:half] if which == "gate" else gate_up[half:]
        raise UserError(f"update_weights: the engine has no tensor {name}")

    def sleep(self) -> None:
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        if self.device.type == "cuda" and (tags is None or "weights" in tags):
            self.model.to(self.device)


def _is_router(module: Any) -> bool:
    return type(module).__name__.endswith("TopKRouter") and hasattr(module, "top_k")


def _sample(logits: Tensor, sampling: SamplingParams, generator: torch.Generator):
    """Sampled token ids and their log-probs under the temperature (before top-k / top-p);
    temperature 0: the most likely token (the first on a tie), log-prob at temperature 1."""
    logp = torch.log_softmax(logits.float() / (sampling.temperature or 1.0), dim=-1)
    if torch.isnan(logp).any() or not torch.isfinite(logp.max(dim=-1).values).all():
        raise NonFiniteRollout("the policy's next-token logits are not finite (NaN or "
                               "infinite) before sampling")
    if sampling.temperature == 0:
        token = logp.argmax(dim=-1)
        return token, logp.gather(-1, token[:, None])[:, 0]
    keep = torch.ones_like(logp, dtype=torch.bool)
    if 0 < sampling.top_k < logp.shape[-1]:
        kth = logp.topk(sampling.top_k, dim=-1).values[..., -1:]
        keep &= logp >= kth
    if sampling.top_p < 1.0:
        probs, order = logp.exp().sort(dim=-1, descending=True)
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        keep &= torch.zeros_like(keep).scatter(-1, order, before < sampling.top_p)
    probs = logp.exp() * keep
    token = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]
    return token, logp.gather(-1, token[:, None])[:, 0]
