"""The ``jmlora`` command line.

    jmlora create-tiny-model DIR [--family llama]      a tiny random checkpoint (no downloads, no torch)
    jmlora generate MODEL --prompt TEXT [--prompt TEXT ...] [--lora NAME=PATH ...] [--max-tokens N] [--temperature T]
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


def _parse_loras(specs: list[str]) -> dict:
    from jmlora.lora.request import LoRARequest

    loras = {}
    for i, spec in enumerate(specs, start=1):
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora takes NAME=PATH, got {spec!r}")
        loras[name] = LoRARequest(name, i, path)
    return loras


def _generate(args: argparse.Namespace) -> int:
    from jmlora.engine.sampling_params import SamplingParams
    from jmlora.entrypoints.llm import LLM

    loras = _parse_loras(args.lora)
    if args.use_lora and args.use_lora not in loras:
        raise ValueError(f"--use-lora {args.use_lora!r} is not among the --lora names {sorted(loras)}")
    start = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len, enable_lora=bool(loras),
              max_loras=max(1, len(loras)), max_lora_rank=args.max_lora_rank, max_num_seqs=max(2, len(args.prompt)),
              warmup=False, seed=args.seed)
    loaded = time.perf_counter()
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    # with --lora and no --use-lora, every prompt runs once per adapter and once on the base model
    variants = [loras[args.use_lora]] if args.use_lora else [None, *loras.values()]
    prompts = [p for p in args.prompt for _ in variants]
    requests = [v for _ in args.prompt for v in variants]
    outputs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
    done = time.perf_counter()
    for prompt, lora, out in zip(prompts, requests, outputs):
        name = lora.lora_name if lora else "base"
        print(f"--- [{name}] prompt: {prompt!r}\n{out.outputs[0].text}")
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
    gen.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="a PEFT adapter; repeatable")
    gen.add_argument("--use-lora", default=None, metavar="NAME", help="run every prompt with this adapter only")
    gen.add_argument("--max-lora-rank", type=int, default=64)
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
