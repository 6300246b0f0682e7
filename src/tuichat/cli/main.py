"""The `tuichat` command: parse arguments, then open the app (through `make_app`) or run a subcommand.

Kept thin and quick: Textual and the HTTP stack are imported only when the TUI actually opens, so
`tuichat --version`, `tuichat ps` and friends answer at once. Every expected failure prints one sentence on
stderr and exits 1 (2 for usage errors), never a traceback.

`tuichat web` starts one plain `tuichat` per browser tab and hands it the server's API key in the environment
variable named by `WEB_API_KEY_ENV` rather than as `--api-key` (a command line is readable by every user); `main`
takes it out of the environment before anything else runs, so no server or tool the tab starts inherits it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence

from tuichat import __version__
from tuichat.errors import TuichatError

# Subcommands and the module that implements each (imported only when used).
SUBCOMMANDS = {
    "serve": "tuichat.cli.server",
    "ps": "tuichat.cli.server",
    "stop": "tuichat.cli.server",
    "logs": "tuichat.cli.server",
    "profiles": "tuichat.cli.server",
    "doctor": "tuichat.cli.server",
    "history": "tuichat.cli.history",
    "export": "tuichat.cli.history",
    "import": "tuichat.cli.history",
    "models": "tuichat.cli.models",
    "quantize": "tuichat.cli.models",
    "pull": "tuichat.cli.models",
    "rm": "tuichat.cli.models",
    "web": "tuichat.web",
    "batch": "tuichat.cli.batch",
}

# The key `tuichat web` gives each tab's tuichat (see the module docstring); the same name as tuichat.web's.
WEB_API_KEY_ENV = "TUICHAT_WEB_API_KEY"

EPILOG = """\
subcommands (tuichat COMMAND --help for each):
  serve [PROFILE] [--detach]   start a server without the TUI
  ps                           list the servers tuichat started
  stop [PROFILE | --all]       stop them (no process or GPU memory left behind)
  logs PROFILE [--follow]      show a server's log
  profiles                     list launch profiles and the config file
  doctor                       lmdeploy, GPUs, config and state paths
  history                      list saved conversations
  export ID [--format md|json] print a conversation
  import FILE                  read an exported conversation back
  models [--root DIR]          list local models, their size and where they live
  pull REPO [--include PAT]    download a model from the Hugging Face hub (or --source modelscope)
  rm MODEL [--yes]             remove a downloaded model
  quantize MODEL --out DIR     W4A16 AWQ quantization with lmdeploy lite
  web [--port 8000] [ARGS]     the same screen in a browser (one tuichat per tab), behind a token
  compare A B [--keep]         one prompt to two servers side by side (profiles, started if needed, or URLs)
  batch PROMPTS --out F.jsonl (--url URL | --profile NAME) [-c N]
                               run a file of prompts, N at a time, into JSONL in input order

environment: TUICHAT_HOME (one folder for config, data and state), OPENAI_BASE_URL, OPENAI_API_KEY,
  HF_ENDPOINT (a hub mirror), HF_HOME / HF_HUB_CACHE (where pulled models go), HF_TOKEN
"""


def chat_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuichat",
        description="Chat with an LMDeploy server (or any OpenAI-compatible one) from the terminal, "
        "and launch, watch and stop local LMDeploy servers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_chat_arguments(parser)
    parser.add_argument("--version", action="version", version=f"tuichat {__version__}")
    return parser


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that choose what the chat screen talks to (shared with `tuichat web`)."""
    parser.add_argument("profile", nargs="?", help="launch profile to attach to or start (see `tuichat profiles`)")
    parser.add_argument("--url", help="server to attach to, e.g. http://127.0.0.1:23333 (or OPENAI_BASE_URL)")
    parser.add_argument("--api-key", help="the server's API key (or OPENAI_API_KEY)")
    parser.add_argument("--model", help="model id to chat with (default: the first the server lists)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--continue", dest="continue_last", action="store_true", help="reopen the last chat")
    group.add_argument("--conversation", type=int, metavar="ID", help="reopen a saved chat by id")


def sub_parser(command: str) -> argparse.ArgumentParser:
    import importlib

    module = importlib.import_module(SUBCOMMANDS[command])
    parser = argparse.ArgumentParser(prog="tuichat")
    subparsers = parser.add_subparsers(dest="command", required=True)
    module.add_subcommands(subparsers)
    return parser


def run_subcommand(argv: Sequence[str]) -> int:
    import importlib

    command = argv[0]
    parser = sub_parser(command)
    args = parser.parse_args(list(argv))
    module = importlib.import_module(SUBCOMMANDS[command])
    result: int = module.run(args)
    return result


def run_tui(args: argparse.Namespace, web_api_key: str | None = None) -> int:
    from tuichat.ui.app import AppOptions, make_app

    options = AppOptions(
        url=args.url,
        api_key=args.api_key or web_api_key,
        model=args.model,
        profile=args.profile,
        continue_last=args.continue_last,
        conversation_id=args.conversation,
    )
    app = make_app(options)
    app.run()
    return int(app.return_code or 0)


def run_compare(argv: Sequence[str]) -> int:
    # its own small Textual app: imported lazily like the chat app, the CLI's other entry to the UI
    from tuichat.ui.compare_app import main as compare_main

    return compare_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    web_api_key = os.environ.pop(WEB_API_KEY_ENV, None) or None
    try:
        if argv and argv[0] == "compare":
            return run_compare(argv[1:])
        if argv and argv[0] in SUBCOMMANDS:
            return run_subcommand(argv)
        # No garbage collection from here until the first screen is out (the app then freezes what start-up
        # made and turns it back on, `TuichatApp.resume_gc`): parsing, importing and composing make ~100
        # young-generation collections that free almost nothing, ~30 ms before the first frame on 2 cores.
        gc.disable()
        try:
            return run_tui(chat_parser().parse_args(argv), web_api_key)
        finally:
            gc.enable()  # (already on since the first screen, unless the app ended before it)
    except TuichatError as exc:
        print(f"tuichat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
