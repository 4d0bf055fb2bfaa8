"""The ``jmlora`` command line.

    jmlora create-tiny-model DIR [--family llama]      a tiny random checkpoint (no downloads, no torch)
    jmlora generate MODEL --prompt TEXT [--prompt TEXT ...] [--max-tokens N] [--temperature T]
"""

from __future__ import annotations

import argparse
import sys
import time


def _create_tiny_model(args: argparse.Namespace) -> int:
    from jmlora.tiny import create_tiny_checkpoint

    path = create_tiny_checkpoint(args.dir, family=args.family, seed=args.seed)
    print(f"wrote a tiny random {args.family} checkpoint to {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from jmlora.generation import LoadedModel, generate_text

    if args.lora:
        print("error: --lora needs the multi-LoRA core, which this build does not have yet", file=sys.stderr)
        return 2
    start = time.perf_counter()
    model = LoadedModel.load(args.model, dtype=args.dtype, max_model_len=args.max_model_len)
    loaded = time.perf_counter()
    texts = generate_text(model, args.prompt, max_new_tokens=args.max_tokens, temperature=args.temperature,
                          seed=args.seed)
    done = time.perf_counter()
    for prompt, text in zip(args.prompt, texts):
        print(f"--- prompt: {prompt!r}\n{text}")
    print(f"(loaded in {loaded - start:.1f}s, generated in {done - loaded:.1f}s)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jmlora", description="Multi-LoRA serving on JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("create-tiny-model", help="write a tiny random checkpoint with a tokenizer")
    tiny.add_argument("dir")
    tiny.add_argument("--family", default="llama", choices=["llama", "mistral", "qwen2", "qwen3", "gemma"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_create_tiny_model)

    gen = sub.add_parser("generate", help="generate text from a Hugging Face model directory")
    gen.add_argument("model", help="model directory (config.json, *.safetensors, tokenizer.json)")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="(not yet supported)")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
