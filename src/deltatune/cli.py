"""The `deltatune` command: train, eval, generate, merge, models.

Each subcommand is a thin function over the trainer package; `train`'s flags are generated from TrainConfig.
Errors a person can fix (settings, data, a stopped run) print one line and exit with status 2 (or 1 for a
stopped run); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from deltatune.checkpoint import check_adapter_name
from deltatune.trainer import config as train_config


def _user_errors() -> tuple[type[Exception], ...]:
    from deltatune.checkpoint import AdapterLoadError
    from deltatune.data import DataError
    from deltatune.embedded import EmbeddedModelError
    from deltatune.trainer.loading import ModelError

    return train_config.ConfigError, DataError, AdapterLoadError, EmbeddedModelError, ModelError, FileNotFoundError


# --- train ------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from deltatune.trainer import train

    train(train_config.config_from_args(args))
    return 0


# --- eval -------------------------------------------------------------------------------------------------
def _adapters(values: Sequence[str] | None) -> dict[str, str]:
    """--adapter PATH or --adapter NAME=PATH (repeatable) as {name: path}; the first unnamed one is "default"."""
    adapters: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or "/" in name or os.sep in name or os.path.exists(value):  # a path that contains "="
            name, path = ("default" if "default" not in adapters else f"adapter{len(adapters)}"), value
        if name in adapters:
            raise train_config.ConfigError(f"Two adapters are named {name!r}; name them NAME=PATH.")
        try:
            check_adapter_name(name)
        except ValueError as err:
            raise train_config.ConfigError(f"--adapter {value}: {err}") from err
        adapters[name] = path
    return adapters


def cmd_eval(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from deltatune.data.formats import parse_columns
    from deltatune.trainer import loading
    from deltatune.trainer.evaluate import evaluate
    from deltatune.trainer.examples import load_eval_set
    from deltatune.trainer.loop import has_accelerator

    path = loading.model_folder(args.model)
    tokenizer = loading.load_tokenizer(path)
    adapters = {"default": args.adapter} if args.adapter else {}
    eval_set, notes = load_eval_set(args.data, tokenizer, format=args.format, max_length=args.max_length,
                                    label_names=loading.adapter_label_names(adapters), max_samples=args.max_samples,
                                    skip_bad_rows=args.skip_bad_rows, columns=parse_columns(args.columns))
    loading.check_adapter_task(adapters, bool(eval_set.label_names), args.data)
    accelerator = Accelerator(cpu=not has_accelerator())
    model = loading.load_with_adapters(path, adapters, eval_set.label_names, tokenizer.pad_token_id)
    model = model.to(accelerator.device)
    metrics = evaluate(model, eval_set, tokenizer, accelerator, batch_size=args.batch_size,
                       generate=args.generate, max_new_tokens=args.max_new_tokens, max_length=args.max_length)
    if accelerator.is_main_process:
        for note in notes:
            print(f"deltatune: {note}", file=sys.stderr)
        what = f"{args.model} + {args.adapter}" if args.adapter else f"{args.model} (no adapter)"
        print(f"Evaluation of {what} on {len(eval_set.examples)} examples of {args.data}")
        for key, value in metrics.items():
            print(f"  {key:<12} {value:.4f}")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(metrics, f, indent=2)
    return 0


# --- generate ---------------------------------------------------------------------------------------------
CHAT_HELP = "Commands: /adapter NAME (switch), /base (no adapter), /reset (forget the conversation), /quit"


def cmd_generate(args: argparse.Namespace) -> int:
    from deltatune.trainer.loading import load_for_inference

    adapters = _adapters(args.adapter)
    model, tokenizer, label_names = load_for_inference(args.model, adapters)
    if label_names:
        raise train_config.ConfigError("This adapter is a classifier: use `deltatune eval` to score data with it.")
    active = args.use or (next(iter(adapters)) if adapters else None)
    if active is not None and active not in adapters:
        raise train_config.ConfigError(f"--use {active!r}: no such adapter; given: {', '.join(adapters)}.")
    options = {"max_new_tokens": args.max_new_tokens}
    if args.temperature > 0:
        options.update(do_sample=True, temperature=args.temperature)
    if args.prompt is not None:
        print(_answer(model, tokenizer, active, args.prompt, options))
        return 0
    return _chat(model, tokenizer, adapters, active, args.system, options)


def _answer(model, tokenizer, adapter: str | None, prompt, options: dict) -> str:
    from contextlib import nullcontext

    from deltatune.trainer.generation import generate_answers

    if adapter is not None:
        model.set_adapter(adapter)
    with model.disable_adapter() if adapter is None and hasattr(model, "disable_adapter") else nullcontext():
        return generate_answers(model, tokenizer, [prompt], **options)[0].strip()


def _chat(model, tokenizer, adapters: dict[str, str], active: str | None, system: str | None, options: dict) -> int:
    """A conversation over stdin: one user turn per line; answers on stdout, everything else on stderr."""
    interactive = sys.stdin.isatty()
    print(f"Chatting with {active or 'the base model'}. {CHAT_HELP}", file=sys.stderr)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages = list(start)
        elif line == "/base":
            active = None
        elif line.startswith("/adapter"):
            name = line.removeprefix("/adapter").strip()
            if name in adapters:
                active = name
            else:
                print(f"No adapter {name!r}; loaded: {', '.join(adapters) or 'none'}", file=sys.stderr)
        elif line.startswith("/"):
            print(CHAT_HELP, file=sys.stderr)
        else:
            messages.append({"role": "user", "content": line})
            reply = _answer(model, tokenizer, active, messages, options)
            messages.append({"role": "assistant", "content": reply})
            print(reply, flush=True)
            continue
        print(f"[{active or 'base model'}]", file=sys.stderr)


# --- merge ------------------------------------------------------------------------------------------------
def cmd_merge(args: argparse.Namespace) -> int:
    from deltatune.trainer.checkpoints import write_folder
    from deltatune.trainer.loading import load_for_inference

    _check_merge_output(args.output, args.overwrite)
    model, tokenizer, _ = load_for_inference(args.model, {"default": args.adapter})
    if model.active_adapter in model.prompt_encoder:
        raise train_config.ConfigError(
            "A prompt-learning adapter (prompt tuning, prefix, p-tuning) has no weights to merge; "
            "load it with the base model instead.")
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as err:  # a method without a weight delta (bottleneck), or NaN in the merged weights
        raise train_config.ConfigError(f"Cannot merge {args.adapter}: {err}") from err

    def write(folder: str) -> None:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_folder(args.output, write)
    print(f"Merged model written to {args.output}")
    return 0


def _check_merge_output(output: str, overwrite: bool) -> None:
    """The merged model replaces --output whole: refuse a folder that holds anything but an earlier merged model
    (config.json), and that one too without --overwrite."""
    path = os.path.abspath(output)
    if not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path)):
        return
    if not os.path.isdir(path):
        raise train_config.ConfigError(f"--output {output} is a file; give a folder for the merged model.")
    if os.getcwd() == path or os.getcwd().startswith(path + os.sep):
        raise train_config.ConfigError(f"--output {output} holds the current directory; give a new folder.")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise train_config.ConfigError(
            f"--output {output} already holds files that are not a model; give a new or empty folder (the merged "
            "model replaces the whole folder).")
    if not overwrite:
        raise train_config.ConfigError(f"--output {output} already holds a model; pass --overwrite to replace it.")


# --- models -----------------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from deltatune.embedded import list_models, prepare

    if args.prepare:
        print(prepare(args.prepare, progress=lambda line: print(line, file=sys.stderr)))
        return 0
    for model in list_models():
        where = str(model.path) if model.path else "not prepared (deltatune models --prepare NAME)"
        print(f"{model.name:<24} {model.kind:<10} {model.description}\n{'':<24} {where}")
    return 0


# --- parser -----------------------------------------------------------------------------------------------
def _positive(value: str) -> int:
    """An argparse type: a bad value ends in argparse's one-line usage error (status 2), not a traceback."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return number


def _model_options(parser: argparse.ArgumentParser, adapter: str) -> None:
    """--model, and --adapter: "optional" (one folder), "required" (one folder) or "several" ([NAME=]PATH ...)."""
    parser.add_argument("--model", required=True, help="base model: embedded name, local folder or Hub id")
    if adapter == "several":
        parser.add_argument("--adapter", action="append", metavar="[NAME=]PATH",
                            help="adapter folder to load; repeat for several (name them NAME=PATH)")
    else:
        parser.add_argument("--adapter", required=adapter == "required", metavar="PATH", help="adapter folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a model (settings from a YAML file and/or flags)",
                                description="Every setting can be given in the YAML file and as a flag; "
                                            "flags win.")
    train.add_argument("config", nargs="?", help="YAML file of settings (see examples/)")
    train_config.add_arguments(train)
    train.set_defaults(func=cmd_train)

    evaluation = commands.add_parser("eval", help="loss, perplexity and exact match/accuracy of a model on data")
    _model_options(evaluation, "optional")
    evaluation.add_argument("--data", required=True, help="data file to evaluate on")
    evaluation.add_argument("--format", help="data format (default: detected)")
    evaluation.add_argument("--columns", type=lambda v: v.split(","), metavar="FROM=TO,...",
                            help="rename data columns, e.g. question=prompt,answer=completion")
    evaluation.add_argument("--max-length", type=_positive, default=512)
    evaluation.add_argument("--batch-size", type=_positive, default=8)
    evaluation.add_argument("--max-samples", type=_positive, help="evaluate on at most this many rows")
    evaluation.add_argument("--generate", action=argparse.BooleanOptionalAction, default=True,
                            help="score exact match by generating answers (generative formats)")
    evaluation.add_argument("--max-new-tokens", type=_positive, default=64)
    evaluation.add_argument("--skip-bad-rows", action="store_true")
    evaluation.add_argument("--json", metavar="PATH", help="also write the metrics to this JSON file")
    evaluation.set_defaults(func=cmd_eval)

    generate = commands.add_parser("generate", help="answer one prompt, or chat over stdin")
    _model_options(generate, "several")
    generate.add_argument("--use", metavar="NAME", help="adapter to start with (default: the first)")
    generate.add_argument("--prompt", help="answer this prompt and exit (default: chat, one turn per line)")
    generate.add_argument("--system", help="system message for the chat")
    generate.add_argument("--max-new-tokens", type=_positive, default=256)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.set_defaults(func=cmd_generate)

    merge = commands.add_parser("merge", help="fold an adapter into the base weights; write a plain model folder")
    _model_options(merge, "required")
    merge.add_argument("--output", required=True, help="folder for the merged model and its tokenizer")
    merge.add_argument("--overwrite", action="store_true", help="replace --output if it already holds a model")
    merge.set_defaults(func=cmd_merge)

    models = commands.add_parser("models", help="list the embedded models, or prepare one")
    models.add_argument("--prepare", metavar="NAME", help="download and convert this embedded model")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from deltatune.trainer.loop import TrainingStopped

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrainingStopped as err:
        print(f"deltatune: stopped: {err}", file=sys.stderr)
        return 1
    except _user_errors() as err:
        print(f"deltatune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
