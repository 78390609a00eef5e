"""Accuracy of sparse decode per block-selection policy and KV budget.

For every policy of ``--policies`` (INFINIGEN and the peer policies Quest,
H2O and StreamingLLM) at every budget of ``--budgets`` (the fraction of a
request's KV blocks read per layer at decode), plus ``dense`` (every block,
read through the same path: the exact reference), one run measures:

* **perplexity** of long natural text (the PG-19 excerpt in
  ``../shared/data``, read in place) and of long code (Python standard-library
  sources, read in place), computed *through vLLM's decode path*. Prefill is
  always dense in this engine and only decode steps select blocks, so prompt
  logprobs would measure nothing: the first ``P`` tokens of a document are the
  prompt and the next tokens are forced one decode step at a time by a logits
  processor (:class:`ForcedTokens`). vLLM returns the logprob of the sampled
  token taken *before* logits processors run (``logprobs_mode`` is
  ``raw_logprobs``), i.e. the forced token's logprob under the model's own
  distribution at that step; perplexity is ``exp(-mean logprob)``.
* **pass-key retrieval**: a five-digit number hidden at a depth of repeated
  filler text of a given length, asked for at the end. The question is forced
  through decode steps too, so that the question and every answer token are
  computed by sparse attention over the context; correct when the greedy
  answer contains the number.
* **greedy agreement with dense** on code completion (standard-library
  modules cut mid-file): the share of ``--agree-tokens`` greedy tokens before
  the first token that differs from the dense run's.

In all three, the token the (dense) prefill predicts is overridden by the
document's own next token and never scored: every scored token comes from a
decode step. Budgets are exact (``--min-blocks 0`` by default, where the
engine's own default floors a request's budget at 8 blocks). One in-process
engine serves the whole run: it keeps the
metadata of every policy from the start (``infinigen_track``), prefills every
prompt once at policy ``dense`` (the KV stays in vLLM's prefix cache), then
switches policy and budget with ``infinigen_configure`` and runs all the
requests of one configuration in one ``generate`` call, so each configuration
pays only its decode steps. The measured share of blocks read
(``infinigen_stats``) is recorded per configuration.

    python benchmarks/accuracy.py --quick   # about 10 minutes on 2 cores
    python benchmarks/accuracy.py           # about 35 minutes

Writes ``benchmarks/results/accuracy.json`` (``--quick``:
``accuracy_quick.json``) and a plot next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_infinigen.engine.policies.registry import POLICIES as REGISTERED
from vllm_infinigen.engine.policies.registry import policy_class
from vllm_infinigen.method.agreement import prefix_agreement

# In-process engine (deterministic, and the logits processor class below is
# used as is, not pickled); vLLM reads these when the engine starts.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.v1.sample.logits_processor import (  # noqa: E402
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BOOK = REPO.parent / "shared" / "data" / "pg19_firstbook.txt"

#: Sparse policies compared (``dense`` is always run as the reference).
#: The sparse policies (every registered policy that chooses blocks).
POLICIES: tuple[str, ...] = tuple(
    name for name in REGISTERED if not policy_class(name).reads_everything
)
#: ``SamplingParams.extra_args`` key of the token ids to force, in order.
FORCE_KEY = "forced_token_ids"
#: Standard-library modules (mostly code) the perplexity documents are made
#: of: document ``i`` is these files from the ``i``-th on, wrapping around.
CODE_FILES: tuple[str, ...] = (
    "_collections_abc.py",
    "functools.py",
    "enum.py",
    "typing.py",
    "ast.py",
    "inspect.py",
)
#: Standard-library files of the greedy-agreement prompts (cut mid-file).
AGREE_FILES: tuple[str, ...] = (
    "argparse.py",
    "difflib.py",
    "dataclasses.py",
    "textwrap.py",
    "tarfile.py",
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. "
    "Here we go. There and back again."
)
QUESTION = "\n\nWhat is the pass key? The pass key is"
#: Greedy tokens after the question: a space and five digits, with room.
PASSKEY_ANSWER_TOKENS = 8
#: Engine start with the calibration cached (seconds), for the estimate.
ENGINE_START_S = 40.0


class ForcedTokens(LogitsProcessor):
    """Teacher forcing: a request whose ``extra_args[FORCE_KEY]`` lists token
    ids gets, at output position ``i < len(list)``, every logit set to -inf
    except that of ``list[i]``; later positions are left alone (greedy).

    It changes the argmax, so vLLM applies it to greedy requests as well.
    """

    def __init__(
        self, vllm_config: Any, device: torch.device, is_pin_memory: bool
    ) -> None:
        # persistent-batch row -> (token ids to force, live output token ids)
        self.rows: dict[int, tuple[list[int], list[int]]] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        forced = (sampling_params.extra_args or {}).get(FORCE_KEY)
        if forced is not None and not (
            isinstance(forced, list) and all(isinstance(t, int) for t in forced)
        ):
            raise ValueError(f"extra_args[{FORCE_KEY!r}] must be a list of ints")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for row in batch_update.removed:
            self.rows.pop(row, None)
        for row, params, _prompt, output in batch_update.added:
            forced = (params.extra_args or {}).get(FORCE_KEY)
            if forced:
                self.rows[row] = (list(forced), output)
            else:
                self.rows.pop(row, None)
        for src, dst, direction in batch_update.moved:
            moving = self.rows.pop(src, None)
            displaced = self.rows.pop(dst, None)
            if moving is not None:
                self.rows[dst] = moving
            if displaced is not None and direction == MoveDirectionality.SWAP:
                self.rows[src] = displaced

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows, tokens = [], []
        for row, (forced, output) in self.rows.items():
            if len(output) < len(forced):
                rows.append(row)
                tokens.append(forced[len(output)])
        if rows:
            index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            token = torch.tensor(tokens, dtype=torch.long, device=logits.device)
            logits[index] = float("-inf")
            logits[index, token] = 0.0
        return logits


@dataclass
class Request:
    """One prompt of the benchmark and what its decode steps are forced to."""

    task: str
    """``perplexity``, ``passkey`` or ``agreement``."""
    name: str
    prompt: list[int]
    forced: list[int]
    """Output tokens forced from the first one on (the first overrides the
    dense prefill's own prediction and is never scored)."""
    free: int
    """Greedy tokens after the forced ones."""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def max_tokens(self) -> int:
        return len(self.forced) + self.free


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_document(tokenizer: Any, index: int, tokens: int) -> list[int]:
    """Document ``index``: :data:`CODE_FILES` from the ``index``-th on (read
    in place), concatenated to at least ``tokens`` tokens."""
    order = CODE_FILES[index % len(CODE_FILES) :] + CODE_FILES
    text = ""
    for name in order:
        text += (stdlib_dir() / name).read_text(encoding="utf-8")
        ids = tokenizer.encode(text)
        if len(ids) >= tokens:
            return list(ids[:tokens])
    raise ValueError(f"code document {index} has fewer than {tokens} tokens")


def perplexity_requests(
    tokenizer: Any,
    book_tokens: int,
    code_tokens: list[int],
    code_docs: int,
    scored: int,
) -> list[Request]:
    """Prompt: a document's first ``P`` tokens; forced: its next
    ``1 + scored``. Documents of one kind and ``P`` form one group, whose
    perplexity pools their scored tokens."""
    docs: list[tuple[str, str, list[int], int]] = []
    if book_tokens > 0:
        book = tokenizer.encode(BOOK.read_text(encoding="utf-8"))
        prefix = min(book_tokens, len(book) - scored - 1)
        docs.append(("book", BOOK.name, book, prefix))
    for i in range(code_docs if code_tokens else 0):
        code = code_document(tokenizer, i, max(code_tokens) + scored + 1)
        start = CODE_FILES[i % len(CODE_FILES)]
        docs += [("code", start, code, prefix) for prefix in code_tokens]
    return [
        Request(
            "perplexity",
            f"{kind}-{prefix}:{source}",
            doc[:prefix],
            doc[prefix : prefix + scored + 1],
            0,
            {
                "group": f"{kind}-{prefix}",
                "source": source,
                "prefix_tokens": prefix,
                "scored_tokens": scored,
            },
        )
        for kind, source, doc, prefix in docs
    ]


def passkey_requests(
    tokenizer: Any, lengths: list[int], depths: list[float], seed: int
) -> list[Request]:
    """A pass key at each depth of filler, ``length`` tokens with the question."""
    rng = random.Random(seed)
    head = tokenizer.encode(
        "There is an important pass key hidden inside a lot of irrelevant text. "
        "Find it and memorize it.\n\n"
    )
    question = tokenizer.encode(QUESTION)
    unit = len(tokenizer.encode(" " + FILLER))
    requests = []
    for length in lengths:
        repeats = max((length - len(head) - len(question) - 20) // unit, 1)
        for depth in depths:
            key = rng.randrange(10_000, 100_000)
            before = round(repeats * depth)
            text = " ".join(
                [FILLER] * before
                + [f"The pass key is {key}. Remember it. {key} is the pass key."]
                + [FILLER] * (repeats - before)
            )
            prompt = head + tokenizer.encode(text)
            requests.append(
                Request(
                    "passkey",
                    f"passkey-{length}-{depth:g}",
                    prompt,
                    question,
                    PASSKEY_ANSWER_TOKENS,
                    {
                        "length": length,
                        "depth": depth,
                        "passkey": key,
                        "tokens": len(prompt) + len(question),
                    },
                )
            )
    return requests


def agreement_requests(
    tokenizer: Any, count: int, prompt_tokens: int, generated: int
) -> list[Request]:
    """The first ``prompt_tokens`` of a module; its next token is forced."""
    requests = []
    for name in AGREE_FILES[:count]:
        ids = tokenizer.encode((stdlib_dir() / name).read_text(encoding="utf-8"))
        if len(ids) <= prompt_tokens:
            raise ValueError(f"{name} has only {len(ids)} tokens")
        requests.append(
            Request(
                "agreement",
                f"agree-{name}",
                list(ids[:prompt_tokens]),
                [ids[prompt_tokens]],
                generated,
                {"file": name, "prompt_tokens": prompt_tokens},
            )
        )
    return requests


def sampling_params(request: Request) -> SamplingParams:
    return SamplingParams(
        temperature=0.0,
        max_tokens=request.max_tokens,
        ignore_eos=True,
        logprobs=0,
        extra_args={FORCE_KEY: request.forced},
    )


def run_config(llm: Any, requests: list[Request]) -> tuple[list[Any], float]:
    """One ``generate`` over every request; checks the forced tokens."""
    start = time.perf_counter()
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=r.prompt) for r in requests],
        [sampling_params(r) for r in requests],
        use_tqdm=False,
    )
    seconds = time.perf_counter() - start
    for request, output in zip(requests, outputs, strict=True):
        got = list(output.outputs[0].token_ids)
        assert len(got) == request.max_tokens, (request.name, len(got))
        assert got[: len(request.forced)] == request.forced, (
            f"{request.name}: sampled tokens differ from the forced ones"
        )
    return outputs, seconds


def score(
    requests: list[Request], outputs: list[Any], dense: list[list[int]] | None, tok: Any
) -> dict[str, Any]:
    """Perplexities, pass-key answers and agreement of one configuration."""
    nll: dict[str, list[float]] = {}
    per_document: dict[str, float] = {}
    passkeys: list[dict[str, Any]] = []
    agreement: dict[str, float] = {}
    for i, (request, output) in enumerate(zip(requests, outputs, strict=True)):
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        free = ids[len(request.forced) :]
        if request.task == "perplexity":
            # position 0 is the dense prefill's prediction: not scored
            losses = [
                -completion.logprobs[j][ids[j]].logprob for j in range(1, len(ids))
            ]
            per_document[request.name] = math.exp(sum(losses) / len(losses))
            nll.setdefault(request.meta["group"], []).extend(losses)
        elif request.task == "passkey":
            answer = tok.decode(free)
            passkeys.append(
                {
                    "length": request.meta["length"],
                    "depth": request.meta["depth"],
                    "found": str(request.meta["passkey"]) in answer,
                    "answer": answer,
                }
            )
        else:
            agreement[request.name] = (
                1.0 if dense is None else prefix_agreement(dense[i], free)
            )
    found = [p["found"] for p in passkeys]
    by_length: dict[int, list[bool]] = {}
    for p in passkeys:
        by_length.setdefault(p["length"], []).append(p["found"])
    return {
        "perplexity": {k: math.exp(sum(v) / len(v)) for k, v in nll.items()},
        "perplexity_per_document": per_document,
        "passkey_accuracy": sum(found) / len(found) if found else None,
        "passkey_accuracy_by_length": {
            length: sum(v) / len(v) for length, v in by_length.items()
        },
        "passkey": passkeys,
        "agreement": sum(agreement.values()) / len(agreement) if agreement else None,
        "agreement_per_prompt": agreement,
    }


def estimate(requests: list[Request], configs: int) -> float:
    """Seconds for the whole run, from speeds measured on the 2-core machine
    (float32, Qwen2.5-Coder-0.5B): prefill about 100 tokens/s at 2K and 50 at
    8K; a decode step about 0.25 s (every weight read once) plus 0.035 s per
    1K tokens of context of the requests still decoding."""
    prefill = sum(len(r.prompt) * (1 / 155 + len(r.prompt) * 1.7e-6) for r in requests)
    decode = 0.0
    for step in range(max(r.max_tokens for r in requests)):
        active = sum(len(r.prompt) for r in requests if r.max_tokens > step)
        decode += 0.25 + 0.035 * active / 1024
    return ENGINE_START_S + prefill + configs * decode


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["configs"]
    dense = next(c for c in configs if c["policy"] == "dense")
    sparse = [c for c in configs if c["policy"] != "dense"]
    policies = list(dict.fromkeys(c["policy"] for c in sparse))
    panels: list[tuple[str, Any]] = [
        (f"perplexity: {name}", lambda c, n=name: c["perplexity"][n])
        for name in dense["perplexity"]
    ]
    if dense["passkey_accuracy"] is not None:
        panels.append(("pass-key accuracy", lambda c: c["passkey_accuracy"]))
    if dense["agreement"] is not None:
        panels.append(("greedy agreement with dense", lambda c: c["agreement"]))
    cols = 2 if len(panels) == 4 else min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows))
    flat = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax, (title, value) in zip(flat, panels, strict=False):
        for i, policy in enumerate(policies):
            points = sorted(
                (c["budget"], value(c)) for c in sparse if c["policy"] == policy
            )
            # shrinking markers keep coinciding points of several policies seen
            ax.plot(
                *zip(*points, strict=True),
                marker="osD^v"[i % 5],
                markersize=9 - 1.5 * i,
                label=policy,
            )
        ax.axhline(value(dense), color="black", linestyle="--", label="dense")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("KV budget (fraction of blocks read)")
        ax.grid(alpha=0.3)
    for ax in flat[len(panels) :]:
        ax.axis("off")
    flat[0].legend(fontsize=8)
    fig.suptitle(f"Sparse decode accuracy, {Path(result['model']).name} (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="(a | b): the default with --quick | without it.",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="~2K-token prompts, ~10 min")
    add("--model", default=None, help="model folder (default: the project's)")
    add("--dtype", default="float32", help="float32 on AVX2 CPUs")
    add("--policies", nargs="+", default=list(POLICIES), help="sparse policies")
    add("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    add(
        "--min-blocks",
        type=int,
        default=0,
        help="budget floor in blocks (engine default 8); 0: the budget is exact",
    )
    add("--book-tokens", type=int, help="PG-19 prompt tokens (2048; 0: none)")
    add("--code-tokens", type=int, nargs="*", help="code prompt tokens (2048 | 4096)")
    add("--code-docs", type=int, default=2, help="code documents per length")
    add("--scored-tokens", type=int, help="scored tokens per document (48 | 80)")
    add(
        "--passkey-lengths",
        type=int,
        nargs="*",
        help="pass-key prompt tokens (2048 | 2048 4096 8192)",
    )
    add("--passkey-depths", type=float, nargs="*", default=[0.1, 0.5, 0.9])
    add("--agree-prompts", type=int, help="code-completion prompts (2 | 3)")
    add("--agree-prompt-tokens", type=int, help="their tokens (1536 | 2048)")
    add("--agree-tokens", type=int, help="greedy tokens compared (24 | 32)")
    add("--seed", type=int, default=0, help="of the pass keys")
    add("--out", help="JSON path (default: benchmarks/results/accuracy[_quick].json)")
    add("--replot", action="store_true", help="only redraw the plot of --out")
    args = parser.parse_args()
    quick = args.quick
    defaults: dict[str, Any] = {
        "book_tokens": 2048,
        "code_tokens": [2048] if quick else [4096],
        "scored_tokens": 48 if quick else 80,
        "passkey_lengths": [2048] if quick else [2048, 4096, 8192],
        "agree_prompts": 2 if quick else 3,
        "agree_prompt_tokens": 1536 if quick else 2048,
        "agree_tokens": 24 if quick else 32,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.policies) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}; known: {POLICIES}")
    if args.out is None:
        args.out = str(RESULTS / ("accuracy_quick.json" if quick else "accuracy.json"))
    if args.replot:
        out = Path(args.out)
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return
    if args.model is None:
        from vllm_infinigen.models import DEFAULT_MODEL, build_model

        args.model = str(build_model(DEFAULT_MODEL))

    from transformers import AutoTokenizer
    from vllm import LLM

    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {message}", flush=True)

    tok = AutoTokenizer.from_pretrained(args.model)
    requests = perplexity_requests(
        tok, args.book_tokens, args.code_tokens, args.code_docs, args.scored_tokens
    )
    requests += passkey_requests(
        tok, args.passkey_lengths, args.passkey_depths, args.seed
    )
    if args.agree_prompts > 0:
        requests += agreement_requests(
            tok, args.agree_prompts, args.agree_prompt_tokens, args.agree_tokens
        )
    configs: list[dict[str, Any]] = [{"policy": "dense", "budget": 1.0}]
    configs += [{"policy": p, "budget": b} for p in args.policies for b in args.budgets]
    longest = max(len(r.prompt) + r.max_tokens for r in requests)
    prefill_tokens = sum(len(r.prompt) for r in requests)
    log(
        f"{len(requests)} requests ({prefill_tokens} prompt tokens, longest "
        f"{longest}), {len(configs)} configurations x "
        f"{max(r.max_tokens for r in requests)} decode steps; estimate "
        f"{estimate(requests, len(configs)) / 60:.0f} min"
    )

    # Selection at every length (sparse_min_tokens 0): accuracy measures the
    # selection, also where the engine would read short steps whole.
    options = {
        "policy": "infinigen",
        "min_blocks": args.min_blocks,
        "sparse_min_tokens": 0,
    }
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        enforce_eager=True,
        attention_backend="INFINIGEN",
        additional_config={"infinigen": options},
        max_model_len=longest + 16,
        enable_prefix_caching=True,
        max_num_batched_tokens=2048,
        logits_processors=[ForcedTokens],
        seed=0,
    )
    tracked = llm.collective_rpc("infinigen_track", args=(list(args.policies),))
    log(f"engine ready; tracking {tracked[0]}")

    def configure(config: dict[str, Any]) -> dict[str, Any]:
        wanted = {**config, "min_blocks": args.min_blocks}
        return dict(llm.collective_rpc("infinigen_configure", args=(wanted,))[0])

    configure(configs[0])
    start = time.perf_counter()
    llm.generate(
        [TokensPrompt(prompt_token_ids=r.prompt) for r in requests],
        SamplingParams(temperature=0.0, max_tokens=1),
        use_tqdm=False,
    )
    warm_s = time.perf_counter() - start
    log(f"prefilled {prefill_tokens} tokens in {warm_s:.0f} s")

    rows: list[dict[str, Any]] = []
    dense_ids: list[list[int]] | None = None
    for n, config in enumerate(configs, 1):
        effective = configure(config)
        llm.collective_rpc("infinigen_reset_stats")
        outputs, seconds = run_config(llm, requests)
        stats = llm.collective_rpc("infinigen_stats")[0]
        total = stats.get("total", {})
        row = {
            **config,
            "selection_fraction": total.get("selection_fraction"),
            "blocks_selected": total.get("blocks_selected"),
            "blocks_total": total.get("blocks_total"),
            "seconds": seconds,
            "prompt_tokens_cached": sum(o.num_cached_tokens or 0 for o in outputs),
            "options": effective,
            **score(requests, outputs, dense_ids, tok),
        }
        if config["policy"] == "dense":
            dense_ids = [
                list(o.outputs[0].token_ids)[len(r.forced) :]
                for r, o in zip(requests, outputs, strict=True)
            ]
        rows.append(row)
        ppl = " ".join(f"{k} {v:.3f}" for k, v in row["perplexity"].items())
        read = row["selection_fraction"]
        left = (len(configs) - n) * seconds
        log(
            f"{n}/{len(configs)} {config['policy']} {config['budget']:g}: "
            f"read {read if read is None else round(read, 3)}, ppl {ppl}, passkey "
            f"{row['passkey_accuracy']}, agreement {row['agreement']} ({seconds:.0f} "
            f"s, {row['prompt_tokens_cached']} prompt tokens cached; "
            f"~{left / 60:.0f} min left)"
        )

    result = {
        "command": "python benchmarks/accuracy.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": args.model,
        "dtype": args.dtype,
        "seconds": time.perf_counter() - t0,
        "prefill_seconds": warm_s,
        "min_blocks": args.min_blocks,
        "requests": [
            {
                "task": r.task,
                "name": r.name,
                "prompt_tokens": len(r.prompt),
                "forced_tokens": len(r.forced),
                "greedy_tokens": r.free,
                **r.meta,
            }
            for r in requests
        ],
        "configs": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    log(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
