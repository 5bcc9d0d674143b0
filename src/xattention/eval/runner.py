"""The RULER-style suite: full attention vs XAttention settings on the same generated samples.

For every (length, task, sample) the prompt is prefilled and answered greedily once per method:
``full`` (the model's own SDPA attention), XAttention at each (threshold, stride), or XAttention
with a calibrated per-head :class:`~xattention.calibration.ThresholdProfile`. Methods run batch by
batch (``batch_size`` samples of one task, left-padded), so an interrupted run still compares
methods on the same samples; finished records are appended to a JSONL file and skipped when the
run is resumed.

Batching only changes speed: the integration runs XAttention on each padded sequence's own rows
exactly, and decode is dense, so a batched answer is the unbatched one up to float rounding.

Density is measured, not assumed: the prefill records the block masks of every layer XAttention
handles (``integrations.transformers.last_stats``); a record keeps the candidate-weighted mean
over those layers and the per-layer values. With ``batch_size > 1`` these are the batch's pooled
counts, shared by the batch's records (``density_scope`` says which).

>>> from xattention.eval.runner import Method, run_suite
>>> methods = [Method.full(), Method(threshold=0.9, stride=8)]
>>> run_suite("smollm2", [2048], ["niah_single_1"], methods, num_samples=5,
...           out="eval/results/smollm2.jsonl")                   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .._backend import warn_once
from . import ruler
from .records import machine_info, meta_path, read_records, write_meta

__all__ = ["Method", "parse_methods", "run_suite", "sample_hash", "machine_info", "read_records",
           "meta_path"]


@dataclass(frozen=True)
class Method:
    """``full`` attention, XAttention with one threshold / stride / block size, or XAttention
    with the per-head thresholds of a calibration profile (``profile``: path of its JSON).
    ``estimate_dtype="fp8"`` runs the estimate on FP8 operands (``torch.float8_e4m3fn``)."""

    threshold: float | None = None
    stride: int = 8
    block_size: int = 128
    profile: str | None = None
    label: str | None = None
    estimate_dtype: str | None = None

    @staticmethod
    def full() -> Method:
        return Method(threshold=None)

    @staticmethod
    def from_profile(path: str | Path, label: str | None = None) -> Method:
        """XAttention with a :class:`~xattention.calibration.ThresholdProfile` (stride and block
        size are the profile's)."""
        from ..profile import ThresholdProfile

        profile = ThresholdProfile.load(path)
        return Method(threshold=None, stride=profile.stride, block_size=profile.block_size,
                      profile=str(path), label=label)

    @staticmethod
    def parse(spec: str) -> Method:
        """A method from its name: ``full``, ``t0.9-s8`` (``xattn-`` optional), ``t0.9-s8-b64``,
        ``t0.9-s8-fp8``, or ``profile:PATH`` / ``profile:PATH=LABEL``."""
        if not isinstance(spec, str):
            raise TypeError(f"a method spec must be a str, got {type(spec).__name__}")
        if spec == "full":
            return Method.full()
        if spec.startswith("profile:"):
            path, _, label = spec[len("profile:"):].partition("=")
            return Method.from_profile(path, label or None)
        match = _SPEC.fullmatch(spec.removeprefix("xattn-"))
        if match is None:
            raise ValueError(f"method {spec!r} is not 'full', 't<threshold>-s<stride>"
                             "[-b<block>][-fp8]' or 'profile:PATH[=LABEL]'")
        t, s, b, fp8 = match.groups()
        return Method(threshold=float(t), stride=int(s), block_size=int(b or 128),
                      estimate_dtype="fp8" if fp8 else None)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.profile is not None:
            return f"profile-{Path(self.profile).stem}"
        if self.threshold is None:
            return "full"
        return (f"xattn-t{self.threshold:g}-s{self.stride}"
                + ("" if self.block_size == 128 else f"-b{self.block_size}")
                + ("-fp8" if self.estimate_dtype == "fp8" else ""))

    @property
    def is_full(self) -> bool:
        return self.threshold is None and self.profile is None


_SPEC = re.compile(r"t([0-9.]+)-s([0-9]+)(?:-b([0-9]+))?(-fp8)?")


def parse_methods(thresholds: Sequence[float], strides: Sequence[int], block_size: int = 128,
                  include_full: bool = True) -> list[Method]:
    """``full`` plus the grid thresholds x strides."""
    methods = [Method.full()] if include_full else []
    for stride in strides:
        for t in thresholds:
            methods.append(Method(threshold=float(t), stride=int(stride), block_size=block_size))
    return methods


def _key(rec: dict[str, Any]) -> tuple:
    return rec["model"], rec["length"], rec["task"], rec["index"], rec["method"]


@torch.no_grad()
def _answer(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int
            ) -> list[tuple[str, int, int]]:
    """Greedy answers of a batch: ``(text, prompt tokens, generated tokens)`` per prompt."""
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last column
    if tokenizer.pad_token is None:  # padded positions are masked out: any id will do
        tokenizer.pad_token = tokenizer.eos_token
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=len(prompts) > 1,
                        add_special_tokens=not ruler.has_bos(tokenizer, prompts[0]))
    finally:
        tokenizer.padding_side = padding_side
    enc = {k: v.to(model.device) for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         temperature=None, top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:].cpu()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    answers = []
    for row, mask in zip(new.tolist(), enc["attention_mask"].cpu(), strict=True):
        # Finished rows are filled with padding: count up to and including the first EOS.
        length = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        answers.append((tokenizer.decode(row[:length], skip_special_tokens=True),
                        int(mask.sum()), length))
    return answers


def run_suite(
    model_name: str,
    lengths: Iterable[int],
    tasks: Iterable[str],
    methods: Sequence[Method],
    *,
    num_samples: int | Mapping[int, int] = 10,
    seed: int = 42,
    out: str | Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    max_new_tokens: int | None = None,
    progress: bool = True,
    loaded: tuple[Any, Any] | None = None,
    time_limit_s: float | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    batch_size: int | Mapping[int, int] = 1,
    round_samples: int | None = None,
) -> list[dict[str, Any]]:
    """Run the suite and append one record per (length, task, sample, method) to ``out``.

    The order is breadth-first, so that a run cut short (by ``time_limit_s``, or a machine given
    back) is already a paired comparison of every method at every length: in rounds of
    ``round_samples`` samples, every length, then every task, then every method gets the round's
    samples before the next round starts. All methods of one batch run back to back (the time
    limit is checked between batches only), on the same machine.

    Args:
        model_name: one of :data:`xattention.eval.models.MODELS`.
        lengths: context lengths in tokens (prompt + generation budget), e.g. ``[2048, 4096]``.
        tasks: RULER task names (:data:`xattention.eval.ruler.ALL_TASKS`).
        methods: :class:`Method` list; ``Method.full()`` is the dense baseline.
        num_samples: samples per (task, length): an int, or ``{length: n}`` for every length.
        seed: seeds the generators (same samples for every method) and torch.
        out: JSONL file (plain; a ``.gz`` one is read but not appended to); its records are kept
            and skipped (resume), across sessions and machines: each record carries the hash of
            its sample, and a record whose sample differs from the one generated now is an error.
        max_new_tokens: cap on RULER's per-task generation budget (None: RULER's budget).
        loaded: an already loaded ``(model, tokenizer)``.
        time_limit_s: stop cleanly (after the current batch) once this much time has passed.
        batch_size: samples of one task answered together (left-padded), an int or
            ``{length: n}``; larger is faster on a GPU, where decoding one sequence leaves the
            device mostly idle.
        round_samples: samples per length in one round of the breadth-first order (default:
            the largest batch size).

    Returns:
        the records of this call (earlier ones are in ``out``).
    """
    from ..integrations import transformers as xt
    from .models import MODELS, load_model

    spec = MODELS[model_name]
    tasks, lengths = list(tasks), [int(n) for n in lengths]
    samples_of = _per_length("num_samples", num_samples, lengths)
    batch_of = _per_length("batch_size", batch_size, lengths)
    if round_samples is None:
        round_samples = max(batch_of.values())
    if isinstance(round_samples, bool) or not isinstance(round_samples, int) or round_samples < 1:
        raise ValueError(f"round_samples must be a positive int, got {round_samples!r}")
    for length in lengths:
        if length > spec.max_context:
            raise ValueError(f"{model_name} has a {spec.max_context}-token context; got {length}")
    out = Path(out)
    if out.suffix == ".gz":
        raise ValueError(f"out must be a plain .jsonl file to append to, got {out}")
    random.seed(seed)
    torch.manual_seed(seed)
    model, tokenizer = loaded if loaded is not None else load_model(model_name, device=device,
                                                                    dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(r): r.get("sample_hash") for r in read_records(out)}
    configs = ruler.load_task_configs()
    log = out.with_suffix(".generator.log")
    write_meta(out, model_name, dict(lengths=lengths, tasks=tasks,
                                      methods=[m.name for m in methods],
                                      num_samples={str(n): samples_of[n] for n in lengths},
                                      seed=seed, device=str(device), dtype=str(dtype),
                                      backend=backend, max_new_tokens=max_new_tokens,
                                      batch_size={str(n): batch_of[n] for n in lengths},
                                      round_samples=round_samples),
                device)
    where = _device_name(model)

    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:  # pragma: no cover - tqdm is a core dependency
        tqdm = None
    total = sum(samples_of.values()) * len(tasks) * len(methods)
    bar = tqdm(total=total, desc=f"{model_name} RULER", disable=not progress) if tqdm else None
    start = time.time()
    new_records: list[dict[str, Any]] = []
    per_length = {}
    try:
        for length in lengths:
            per_task = {task: ruler.generate_samples(task, length, samples_of[length], tokenizer,
                                                     seed=seed, chat=spec.chat, log=log)
                        for task in tasks}
            per_length[length] = per_task
            for task_samples in per_task.values():
                for smp in task_samples:
                    _check_sample(done, out, model_name, length, smp, methods)
        for first in range(0, max(samples_of.values()), round_samples):
            for length in lengths:
                stop = min(first + round_samples, samples_of[length])
                for b0 in range(first, stop, batch_of[length]):
                    for task in tasks:
                        batch = per_length[length][task][b0:min(b0 + batch_of[length], stop)]
                        todo = {m.name: [smp for smp in batch
                                         if (model_name, length, task, smp.index, m.name)
                                         not in done] for m in methods}
                        skipped = sum(len(batch) - len(t) for t in todo.values())
                        if bar is not None and skipped:
                            bar.update(skipped)
                        if not any(todo.values()):
                            continue
                        if time_limit_s is not None and time.time() - start > time_limit_s:
                            raise TimeoutError
                        cfg = configs[task]
                        budget = cfg.tokens_to_generate if max_new_tokens is None else \
                            min(cfg.tokens_to_generate, max_new_tokens)
                        for method in methods:
                            pending = todo[method.name]
                            if not pending:
                                continue
                            if bar is not None:
                                bar.set_postfix_str(f"{length} {task} #{pending[0].index} "
                                                    f"{method.name}")
                            prompts = [ruler.build_prompt(smp, tokenizer, spec.chat)
                                       for smp in pending]
                            recs = _run_batch(model, tokenizer, xt, method, prompts, pending,
                                              cfg, budget, backend)
                            _check_lengths(recs, length, budget, model_name)
                            with open(out, "a") as f:
                                for rec in recs:
                                    rec.update(model=model_name, length=length, seed=seed,
                                               device_name=where)
                                    f.write(json.dumps(rec) + "\n")
                            for rec in recs:
                                done[_key(rec)] = rec["sample_hash"]
                                new_records.append(rec)
                                if on_record is not None:
                                    on_record(rec)
                            if bar is not None:
                                bar.update(len(pending))
    except TimeoutError:
        if bar is not None:
            bar.write(f"time limit reached after {len(new_records)} records; rerun to resume")
    finally:
        if bar is not None:
            bar.close()
        xt.disable(model)
    return new_records


def _per_length(name: str, value: int | Mapping[int, int], lengths: list[int]) -> dict[int, int]:
    """``value`` for every length: an int for all, or a mapping ``{length: n}`` naming each."""
    table = value if isinstance(value, Mapping) else dict.fromkeys(lengths, value)
    missing = [n for n in lengths if n not in table]
    if missing:
        raise ValueError(f"{name} has no entry for lengths {missing}")
    for n in lengths:
        v = table[n]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int (per length), got {v!r} for {n}")
    return {n: int(table[n]) for n in lengths}


def sample_hash(sample: ruler.Sample) -> str:
    """Identity of a generated sample: its text and references (the records' ``sample_hash``)."""
    text = json.dumps([sample.user, sample.answer_prefix, sample.outputs])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_sample(done: dict[tuple, str | None], out: Path, model: str, length: int,
                  sample: ruler.Sample, methods: Sequence[Method]) -> None:
    """A resumed record must come from the sample generated now, or the pairing is void."""
    digest = sample_hash(sample)
    for m in methods:
        stored = done.get((model, length, sample.task, sample.index, m.name))
        if stored is not None and stored != digest:
            raise ValueError(
                f"{out} holds a record of {model} {length} {sample.task} #{sample.index} "
                f"({m.name}) made from another sample (hash {stored}, now {digest}): the "
                "generator, tokenizer or seed differ; write to a new results file")


def _device_name(model: Any) -> str:
    """The GPU's name (or the CPU's): records of one comparison should share it."""
    dev = getattr(model, "device", torch.device("cpu"))
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return machine_info("cpu").get("cpu_model", "cpu")


_PROFILES: dict[str, Any] = {}
_ESTIMATE_DTYPES = {None: None, "fp8": torch.float8_e4m3fn}


def _check_lengths(records: list[dict[str, Any]], length: int, budget: int, model: str) -> None:
    """Warn (once per model) when prompts come out longer than the length they were made for:
    the tokenizer then differs from the one that generated the samples."""
    if max(r["prompt_tokens"] for r in records) + budget > 1.05 * length:
        warn_once(f"{model}: prompts tokenize longer than the length their samples were generated "
                  "for (see prompt_tokens in the records): the tokenizer is not the one that "
                  "generated the samples, so scores are not comparable to other runs")


def _enable(xt: Any, model: Any, method: Method, backend: str) -> None:
    if method.profile is not None:
        if method.profile not in _PROFILES:
            from ..profile import ThresholdProfile

            _PROFILES[method.profile] = ThresholdProfile.load(method.profile)
        xt.enable(model, thresholds=_PROFILES[method.profile], backend=backend)
    else:
        xt.enable(model, threshold=method.threshold, stride=method.stride,
                  block_size=method.block_size, backend=backend,
                  estimate_dtype=_ESTIMATE_DTYPES[method.estimate_dtype])


def _run_batch(model: Any, tokenizer: Any, xt: Any, method: Method, prompts: list[str],
               samples: list[ruler.Sample], cfg: ruler.TaskConfig, budget: int, backend: str
               ) -> list[dict[str, Any]]:
    if method.is_full:
        xt.disable(model)
    else:
        _enable(xt, model, method, backend)
        xt.reset_stats(model)
    t0 = time.perf_counter()
    answers = _answer(model, tokenizer, prompts, budget)
    elapsed = time.perf_counter() - t0
    density, layer_density = 1.0, None
    if not method.is_full:
        stats = xt.last_stats(model)
        density = stats.overall()
        layer_density = {str(k): round(v, 5) for k, v in stats.per_layer().items()}
    records = []
    for sample, (text, prompt_tokens, new_tokens) in zip(samples, answers, strict=True):
        pred = ruler.postprocess(text)
        records.append({
            "task": sample.task, "index": sample.index, "method": method.name,
            "sample_hash": sample_hash(sample),
            "method_spec": asdict(method),
            "score": ruler.score_sample(cfg.metric, pred, sample.outputs),
            "pred": pred, "outputs": sample.outputs,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "time_s": round(elapsed / len(samples), 3), "batch_size": len(samples),
            "density": density, "layer_density": layer_density,
            "density_scope": "sample" if len(samples) == 1 else "batch",
        })
    return records
