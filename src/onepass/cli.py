"""The `onepass` command line: generate, chat, bench, serve, cache, train.

Speculative flags (--method, -k, --prompt-lookup-*) only fill the same speculative config as
--speculative-config JSON; giving a key both ways with different values is an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

from onepass.errors import OnepassError
from onepass.models.loading import DEFAULT_WEIGHTS, KV_CACHE_DTYPES, WEIGHTS

EXIT_USAGE = 2
DEFAULT_METHOD = "auto"  # users run onepass to be faster; auto never drafts what does not pay


class UsageError(OnepassError):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """argparse with onepass's one-line errors (`onepass: error: ...`, exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"onepass: error: {message} (see {self.prog} --help)\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="default",
        help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file or a local "
        "Hugging Face model directory (default: %(default)s)",
    )
    g.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weight and activation dtype (default: %(default)s)",
    )
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument(
        "--weights",
        default=DEFAULT_WEIGHTS,
        choices=WEIGHTS,
        help="kept as stored (GGUF Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16; "
        "bf16 / fp16 safetensors) and widened in the CPU kernels, or dequantized to float32 at "
        "load (the reference): the same output; stored takes less memory and faster steps. "
        "int8: as stored, but Q4_0 / Q4_1 / Q8_0 weights multiplied by 8-bit activations "
        "(llama.cpp's arithmetic): faster still, logits close to but not equal to the others' "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="the KV cache's dtype: float16 reads half the bytes per cached token (long "
        "contexts, batches), each key and value rounded once; auto: float16 with --weights int8, "
        "else the model's (default: %(default)s)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context window to allocate (default: the model's, at most 8192)",
    )


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument(
        "--method",
        default=None,
        help="drafter: auto, ngram, suffix, recycling, lookahead, or none for plain decoding "
        f"(default: {DEFAULT_METHOD} unless --speculative-config names one)",
    )
    g.add_argument(
        "-k",
        "--num-speculative-tokens",
        type=int,
        default=None,
        help="most draft tokens scored per step",
    )
    g.add_argument("--prompt-lookup-min", type=int, default=None, help="ngram: shortest match")
    g.add_argument("--prompt-lookup-max", type=int, default=None, help="ngram: longest match")
    g.add_argument(
        "--speculative-config",
        default=None,
        metavar="JSON",
        help='full config as JSON, vLLM style, e.g. \'{"method": "ngram", '
        '"num_speculative_tokens": 5}\'',
    )


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling (vLLM names)")
    g.add_argument(
        "--max-tokens",
        type=int,
        default=max_tokens,
        help="most tokens to generate (default: %(default)s)",
    )
    g.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)"
    )
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="0 or -1 disables (default: 0)")
    g.add_argument("--min-p", type=float, default=0.0, help="(default: 0.0)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")


def speculative_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """The config the flags and JSON describe; auto when they name nothing, None (plain
    decoding) for --method none."""
    if args.method == "none":
        given = (args.num_speculative_tokens, args.prompt_lookup_min, args.prompt_lookup_max)
        if args.speculative_config or any(v is not None for v in given):
            raise UsageError("--method none (plain decoding) takes no speculative options")
        return None
    config: dict[str, Any] = {}
    if args.speculative_config:
        try:
            config = json.loads(args.speculative_config)
        except json.JSONDecodeError as e:
            raise UsageError(f"--speculative-config is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise UsageError("--speculative-config must be a JSON object")
    flags = {
        "method": args.method,
        "num_speculative_tokens": args.num_speculative_tokens,
        "prompt_lookup_min": args.prompt_lookup_min,
        "prompt_lookup_max": args.prompt_lookup_max,
    }
    for key, value in flags.items():
        if value is None:
            continue
        if key in config and config[key] != value:
            raise UsageError(f"{key} is given both as a flag ({value}) and in JSON ({config[key]})")
        config[key] = value
    if config and "method" not in config:
        raise UsageError('speculative options need --method (or "method" in the JSON)')
    return config or {"method": DEFAULT_METHOD}


def sampling_params(args: argparse.Namespace):
    from onepass.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        ignore_eos=args.ignore_eos,
    )


def load_llm(args: argparse.Namespace):
    from onepass.llm import LLM

    return LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        weights=args.weights,
        kv_cache_dtype=args.kv_cache_dtype,
    )


def summary(label: str, num_tokens: int, metrics: Any, finish_reason: str | None) -> str:
    rate = num_tokens / metrics.total_seconds if metrics.total_seconds else 0.0
    text = (
        f"{label}: {num_tokens} new tokens (prompt {metrics.prompt_tokens}) in "
        f"{metrics.total_seconds:.2f} s ({rate:.1f} tokens/s)"
    )
    if metrics.method != "vanilla":
        text += f", mean acceptance length {metrics.spec.mean_acceptance_length:.2f}"
        if not metrics.lossless:
            text += " [NOT LOSSLESS: typical acceptance]"
    return text + f", finish_reason={finish_reason}"


def stream_to_stdout(llm: Any, prompt: Any, params: Any, spec: Any) -> tuple[str, str]:
    """Print the completion as it is generated; return its text and the summary line."""
    pieces, num_tokens, final = [], 0, None
    for final in llm.stream(prompt, params, speculative_config=spec):
        pieces.append(final.outputs[0].text)
        num_tokens += len(final.outputs[0].token_ids)
        sys.stdout.write(final.outputs[0].text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    label = spec.method if spec else "vanilla"
    return "".join(pieces), summary(
        label, num_tokens, final.metrics, final.outputs[0].finish_reason
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from onepass.config import SpeculativeConfig

    spec = SpeculativeConfig.parse(speculative_config(args))  # validate before loading
    params = sampling_params(args)
    llm = load_llm(args)
    prompt: Any = [{"role": "user", "content": args.prompt}]
    if args.no_chat_template or not getattr(llm.tokenizer, "chat_template", None):
        prompt = args.prompt
    if args.compare:
        compare(llm, prompt, params, spec)
        return
    print(stream_to_stdout(llm, prompt, params, spec)[1], file=sys.stderr)


def compare(llm: Any, prompt: Any, params: Any, spec: Any) -> None:
    """Plain decoding vs the method on the same prompt, after a short warm-up of both."""
    from dataclasses import replace

    from onepass.bench.run import WARMUP_PROMPT

    if spec is None:
        raise UsageError("--compare needs a speculative method (--method ...)")
    run = llm.chat if isinstance(prompt, list) else llm.generate
    # Warm up on another prompt: a drafter that learns across requests would otherwise be
    # timed after having seen this prompt and the start of its answer.
    warm_prompt = (
        [{"role": "user", "content": WARMUP_PROMPT}] if isinstance(prompt, list) else WARMUP_PROMPT
    )
    warm = replace(params, max_tokens=8)
    run(warm_prompt, warm)
    run(warm_prompt, warm, speculative_config=spec)
    base = run(prompt, params)[0]
    fast = run(prompt, params, speculative_config=spec)[0]
    print(fast.outputs[0].text)
    print("-" * 60, file=sys.stderr)
    for label, o in (("plain decoding", base), (spec.method, fast)):
        c = o.outputs[0]
        print(summary(label, len(c.token_ids), o.metrics, c.finish_reason), file=sys.stderr)
    speed = lambda o: len(o.outputs[0].token_ids) / o.metrics.total_seconds  # noqa: E731
    print(f"speedup: {speed(fast) / speed(base):.2f}x", file=sys.stderr)
    same = fast.outputs[0].token_ids == base.outputs[0].token_ids
    note = "" if params.temperature == 0 else " (sampling: equal in distribution, not per token)"
    print(f"outputs identical: {'yes' if same else 'no'}{note}", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from onepass.config import SpeculativeConfig

    if sys.stdin is None or sys.stdin.closed:
        raise UsageError("chat reads the conversation from standard input, which is closed")
    spec = SpeculativeConfig.parse(speculative_config(args))
    params = sampling_params(args)
    llm = load_llm(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    turns: list[dict[str, str]] = []  # user and assistant messages, oldest first
    print("onepass chat: /reset clears the conversation, /exit or Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            turns = []
            continue
        fitted = fit_conversation(
            llm, system, [*turns, {"role": "user", "content": line}], params.max_tokens
        )
        if fitted is None:
            print(
                f"onepass: this message does not fit in the context window "
                f"({llm.max_model_len} tokens with --max-tokens {params.max_tokens}); "
                "send a shorter one",
                file=sys.stderr,
            )
            continue
        turns = fitted
        sys.stdout.write("assistant> ")
        try:
            reply, summary_line = stream_to_stdout(llm, system + turns, params, spec)
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            print("\n[reply interrupted]", file=sys.stderr)
            turns.pop()
            continue
        turns.append({"role": "assistant", "content": reply})
        if args.verbose:
            print(summary_line, file=sys.stderr)


def fit_conversation(
    llm: Any, system: list[dict[str, str]], turns: list[dict[str, str]], max_tokens: int
) -> list[dict[str, str]] | None:
    """Drop the oldest turns (a user message and its answer) until the conversation plus a
    reply of max_tokens fits the context window, saying so; None if even the last message
    alone does not fit."""
    dropped = 0
    while len(llm.chat_template_ids(system + turns)) + max_tokens > llm.max_model_len:
        if len(turns) == 1:
            return None
        turns = turns[2:]
        dropped += 1
    if dropped:
        print(
            f"onepass: the conversation outgrew the context window ({llm.max_model_len} "
            f"tokens); dropped the oldest {dropped} turn(s)",
            file=sys.stderr,
        )
    return turns


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="onepass",
        description="Lossless speculative decoding: draft several tokens, verify them in one "
        "forward pass of the target model.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="generate a completion for one prompt",
        description="Generate text for PROMPT and print a one-line summary.",
    )
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument(
        "--no-chat-template",
        action="store_true",
        help="complete the raw text instead of a chat turn",
    )
    gen.add_argument(
        "--compare",
        action="store_true",
        help="also run plain decoding; print speedup, mean acceptance length and "
        "whether the outputs are identical",
    )
    add_model_args(gen)
    add_sampling_args(gen, max_tokens=128)
    add_speculative_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser(
        "chat",
        help="interactive chat that keeps the conversation",
        description="Chat with the model; the conversation is kept.",
    )
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("-v", "--verbose", action="store_true", help="print speed after each reply")
    add_model_args(chat)
    add_sampling_args(chat, max_tokens=512)
    add_speculative_args(chat)
    chat.set_defaults(func=cmd_chat)

    from onepass.bench.cli import add_bench_parser

    add_bench_parser(sub, add_model_args)
    from onepass.server.cli import add_serve_parser

    add_serve_parser(sub, add_model_args)
    from onepass.cache import add_cache_parser

    add_cache_parser(sub)
    from onepass.train.cli import add_train_parser

    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (OnepassError, ValueError) as e:
        print(f"onepass: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`onepass generate ... | head`): stop quietly, as other tools do,
        # and keep the interpreter's final flush from failing on the closed pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the status of a tool the pipe's reader cut short
    return 0


if __name__ == "__main__":
    sys.exit(main())
