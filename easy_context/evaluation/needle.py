"""Needle in a haystack.

:class:`Haystack` builds prompts of a target token length with the needle inserted at a sentence boundary found in the
text; :func:`forced_answer_predictions` scores by teacher forcing (sequence-parallel prefill), :func:`generate_answer`
by greedy decoding with a KV cache; :func:`plot_needle_heatmaps` draws the accuracy by length and depth.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..comm import all_reduce_sum
from ..data import prepare_seq_parallel_inputs
from .common import ModelSpec, Runtime, decoder_and_head, pyplot

__all__ = ["NeedleConfig", "NeedleTrial", "Haystack", "forced_answer_predictions", "generate_answer",
           "needle_accuracy_grid", "plot_needle_heatmaps", "DEFAULT_NAMES"]

# A sentence ends with . ! or ?, possibly followed by closing quotes or brackets, then whitespace; a blank line
# (paragraph break) is a boundary too.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+|\n\s*\n")

DEFAULT_NAMES = ("Chicago", "Yangon", "Colombo", "Almaty", "Sydney", "Lagos", "Amsterdam", "Belgrade", "Cairo",
                 "Kigali", "Dakar", "Sofia", "Victoria", "Tashkent", "Mumbai", "Barcelona", "Amman", "Toronto")


@dataclass(frozen=True)
class NeedleConfig:
    """What is hidden and asked. ``{answer}`` in ``needle`` is replaced by the trial's answer.

    The answer is ``answer`` when given, else a random number of ``digits`` digits per trial. Distractors are
    ``distractor`` sentences (``{name}``, ``{number}``) with other numbers, at random sentence boundaries.
    """

    needle: str = "The special magic number is: {answer}."
    question: str = "What is the special magic number?"
    answer_prefix: str = "The special magic number is:"
    intro: str = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                  "Find it and memorize it. I will quiz you about it.")
    answer: Optional[str] = None
    digits: int = 7
    distractors: int = 0
    distractor: str = "The special magic number for {name} is: {number}."
    chat_template: bool = True
    seed: int = 0

    def key(self) -> str:
        """A short hash of everything that defines the trials (resuming only reuses trials with the same key)."""
        blob = json.dumps(self.__dict__, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


@dataclass
class NeedleTrial:
    """One prompt. ``input_ids`` ``(1, S)`` ends with the answer tokens, at ``answer_positions``; generation starts
    from ``input_ids[:, :generation_length]`` (the prompt before the answer prefix)."""

    input_ids: torch.Tensor
    answer_positions: torch.Tensor
    generation_length: int
    answer: str
    needle_depth: float
    distractor_numbers: List[str]


def _random_number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


class Haystack:
    """Needle prompts of a given token length from one text, for one tokenizer."""

    def __init__(self, text: str, tokenizer, config: NeedleConfig):
        self.text = text
        self.tokenizer = tokenizer
        self.config = config
        self._offsets: List[Tuple[int, int]] = []
        self._tokenized_chars = 0

    # -- text pieces ----------------------------------------------------------------------------------------------

    def _token_offsets(self, n_tokens: int) -> List[Tuple[int, int]]:
        """Character spans of the first ``n_tokens`` tokens of the text (tokenized once, grown on demand)."""
        chars = max(self._tokenized_chars, 1)
        while len(self._offsets) < n_tokens + 1 and self._tokenized_chars < len(self.text):
            chars = min(len(self.text), max(chars * 2, n_tokens * 6 + 10_000))
            enc = self.tokenizer(self.text[:chars], add_special_tokens=False, return_offsets_mapping=True)
            self._offsets, self._tokenized_chars = list(enc["offset_mapping"]), chars
        if len(self._offsets) < n_tokens:
            raise ValueError(f"the haystack has {len(self._offsets)} tokens, fewer than the {n_tokens} needed")
        return self._offsets

    def _hay(self, n_tokens: int) -> str:
        """The first ``n_tokens`` tokens of the text, as text."""
        if n_tokens <= 0:
            return ""
        return self.text[: self._token_offsets(n_tokens)[n_tokens - 1][1]]

    def _render(self, context: str, answer: str) -> Tuple[str, str, int]:
        """``(full text, generation prompt, answer start character)`` for a context."""
        cfg = self.config
        body = f"{cfg.intro}\n\n{context}\n\n{cfg.question}"
        if cfg.chat_template and getattr(self.tokenizer, "chat_template", None):
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                        add_generation_prompt=True)
        else:
            prompt = f"{body}\n"
        full = f"{prompt}{cfg.answer_prefix} {answer}"
        return full, prompt, len(full) - len(answer)

    def _encode(self, text: str):
        # A chat template already spells out its special tokens; raw text gets the tokenizer's own (e.g. BOS).
        special = not (self.config.chat_template and getattr(self.tokenizer, "chat_template", None))
        return self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)

    # -- trials -----------------------------------------------------------------------------------------------------

    def trial(self, length: int, depth: float, sample: int = 0) -> NeedleTrial:
        """A prompt of at most ``length`` tokens (a few fewer where token merges differ) with the needle at
        ``depth`` (0 = start of the haystack, 1 = end), on the sentence boundary nearest to that point."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        cfg = self.config
        rng = random.Random(f"{cfg.seed}|{length}|{depth:.6f}|{sample}")
        answer = cfg.answer if cfg.answer is not None else _random_number(rng, cfg.digits)
        needle = cfg.needle.format(answer=answer)
        numbers: List[str] = []
        while len(numbers) < cfg.distractors:
            number = _random_number(rng, cfg.digits)
            if number != answer and number not in numbers:
                numbers.append(number)
        names = rng.sample(DEFAULT_NAMES, k=min(len(DEFAULT_NAMES), len(numbers))) if numbers else []
        distractors = [cfg.distractor.format(name=names[i % len(names)], number=n) for i, n in enumerate(numbers)]

        inserts = [needle, *distractors]
        fixed = len(self._encode(self._render(" ".join(inserts), answer)[0]).input_ids)
        budget, best = length - fixed, None
        for _ in range(8):  # token merges at the seams shift the count a little: converge on `length`
            if budget < 0:
                raise ValueError(f"length {length} is too short for the prompt, needle and answer ({fixed} tokens)")
            context, needle_depth = self._place(self._hay(budget), inserts, depth, random.Random(rng.random()))
            full, prompt, answer_start = self._render(context, answer)
            enc = self._encode(full)
            if len(enc.input_ids) <= length and (best is None or len(enc.input_ids) > len(best[3].input_ids)):
                best = (context, needle_depth, (full, prompt, answer_start), enc)
            if len(enc.input_ids) == length:
                break
            budget += length - len(enc.input_ids)
        if best is None:
            raise RuntimeError(f"could not fit a needle prompt into {length} tokens")
        _, needle_depth, (full, prompt, answer_start), enc = best
        offsets = enc["offset_mapping"]
        positions = [i for i, (a, b) in enumerate(offsets) if b > answer_start and a < len(full) and b > a]
        prefix_start = len(prompt)
        generation_length = sum(1 for a, b in offsets if b <= prefix_start)
        if not positions or positions[0] == 0:
            raise RuntimeError("the answer tokens could not be located in the tokenized prompt")
        return NeedleTrial(
            input_ids=torch.tensor([enc.input_ids], dtype=torch.long),
            answer_positions=torch.tensor(positions, dtype=torch.long),
            generation_length=generation_length,
            answer=answer,
            needle_depth=needle_depth,
            distractor_numbers=numbers,
        )

    @staticmethod
    def _place(hay: str, inserts: List[str], depth: float, rng: random.Random) -> Tuple[str, float]:
        """Insert ``inserts[0]`` (the needle) on the sentence boundary nearest to ``depth`` of ``hay`` and
        the others (distractors) on random boundaries; returns the text and the needle's depth in characters."""
        # Boundaries lie just after whitespace. The haystack is cut at a token, so its end is a boundary only
        # when it ends a sentence; otherwise the deepest place is before its last, partial sentence.
        bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(hay)]
        needle_at = min(bounds, key=lambda b: (abs(b - depth * len(hay)), b))
        others = [b for b in bounds if b != needle_at] or bounds
        spots = sorted([(needle_at, 0)] + [(rng.choice(others), i) for i in range(1, len(inserts))])
        pieces, last, needle_char = [], 0, 0
        for at, i in spots:
            pieces.append(hay[last:at])
            last = at
            if i == 0:
                needle_char = sum(map(len, pieces))
            pieces.append(inserts[i] + " ")
        pieces.append(hay[last:])
        context = "".join(pieces).rstrip()
        return context, needle_char / max(1, len(context))


@torch.no_grad()
def forced_answer_predictions(model, spec: ModelSpec, trial: NeedleTrial, runtime: Runtime,
                              sequence_parallel: bool) -> torch.Tensor:
    """The model's greedy (argmax) token at each answer position, given the true tokens before it (teacher forcing).

    With ``sequence_parallel`` all ranks prefill the prompt together, each computes logits only at the positions
    it holds that precede an answer token, and the predictions are summed over ranks (each position is held by one
    rank). Otherwise this process runs the whole prompt.
    """
    decoder, head = decoder_and_head(model)
    ids = trial.input_ids
    if sequence_parallel:
        local = prepare_seq_parallel_inputs(spec.method, ids, None, None, runtime.rank, runtime.world_size,
                                            runtime.device, pad=True)
        ids, pos = local["local_input_ids"], local["local_position_ids"]
    else:
        ids = ids.to(runtime.device)
        pos = torch.arange(ids.shape[1], device=runtime.device).unsqueeze(0)
    hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0]
    wanted = (trial.answer_positions - 1).to(runtime.device)  # logits at p-1 predict token p
    local_pos = pos[0]
    match = local_pos.unsqueeze(1) == wanted.unsqueeze(0)  # (local tokens, answers)
    token_idx, answer_idx = match.nonzero(as_tuple=True)
    preds = torch.zeros(len(wanted), dtype=torch.float64, device=runtime.device)
    if token_idx.numel():
        logits = head(hidden[token_idx]).float()
        preds[answer_idx] = logits.argmax(-1).double() + 1  # +1: zero means "not held here"
    if sequence_parallel and runtime.world_size > 1:
        preds = all_reduce_sum(preds)
    return (preds - 1).long().cpu()


@torch.no_grad()
def generate_answer(model, tokenizer, trial: NeedleTrial, device, max_new_tokens: int = 32) -> str:
    """Greedy decoding with the KV cache from the prompt (without the answer prefix); returns the new text."""
    prompt = trial.input_ids[:, : trial.generation_length].to(device)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else tokenizer.eos_token_id)
    return tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)


def needle_accuracy_grid(records: Iterable[dict], model: str, mode: str):
    """``(lengths, depths, grid)`` with ``grid[d][l]`` the mean ``<mode>_correct`` of that cell (NaN if empty)."""
    cells: Dict[Tuple[float, int], List[float]] = {}
    for r in records:
        if r.get("model") == model and f"{mode}_correct" in r:
            cells.setdefault((float(r["depth"]), int(r["length"])), []).append(float(r[f"{mode}_correct"]))
    lengths = sorted({n for _, n in cells})
    depths = sorted({d for d, _ in cells})
    grid = [[(sum(cells[(d, n)]) / len(cells[(d, n)])) if (d, n) in cells else float("nan") for n in lengths]
            for d in depths]
    return lengths, depths, grid


def plot_needle_heatmaps(records: Sequence[dict], path, modes: Sequence[str], models: Optional[Sequence[str]] = None,
                         title: str = "Needle in a haystack") -> Dict[Tuple[str, str], float]:
    """One heatmap panel (depth × length, accuracy 0-1 from red to green) per model and scoring mode.

    Returns ``{(model, mode): mean accuracy}`` over the trials shown.
    """
    plt = pyplot()
    import numpy as np

    models = list(models) if models else list(dict.fromkeys(r["model"] for r in records))
    panels = [(m, mode) for m in models for mode in modes
              if any(r.get("model") == m and f"{mode}_correct" in r for r in records)]
    if not panels:
        raise ValueError("no trials to plot")
    cols = min(len(panels), 2)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.6 * rows), dpi=120, squeeze=False)
    means = {}
    image = None
    for ax, (model, mode) in zip(axes.flat, panels):
        lengths, depths, grid = needle_accuracy_grid(records, model, mode)
        values = np.array(grid, dtype=float)
        means[(model, mode)] = float(np.nanmean(values)) if values.size else float("nan")
        image = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not math.isnan(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{model}\n{mode} scoring, mean accuracy {means[(model, mode)]:.2f}", fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, y=1.0 + 0.06 / rows)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="accuracy", shrink=0.8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return means
