"""The argument parser every minibert command uses: both flag spellings, one-line errors.

    parser = ArgumentParser(description=__doc__)   # instead of argparse.ArgumentParser
    parser.add_argument("--top-k", type=int, default=5)

Each flag is declared, and shown in --help, with one spelling, but the parser accepts the
other one too: --top_k for --top-k, --batch-size for --batch_size. Users need not remember
which command uses which. A bad or unknown flag raises MinibertError, which the command's
run_main reports as one line (`error: command line: ...`) with exit status 1, like every other
bad input; an unknown flag gets a "did you mean" hint in the spelling the user typed. The
usage line names the command as it was called: `minibert-fill-mask` for the console script,
`python -m minibert.fill_mask` for the module.

The commands that take sentences (fill-mask, score) read `--file F` with `read_sentences`, which
names each one FILE:LINE, and report the sentences they could not take with `report_failures`:
one `error: FILE:LINE: why` line each on stderr, while the others are still answered.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

from .errors import MinibertError


def _other_spelling(flag: str) -> str:
    """--top-k <-> --top_k (the leading dashes stay)."""
    name = flag.lstrip("-")
    dashes = flag[:len(flag) - len(name)]
    return dashes + (name.replace("-", "_") if "-" in name else name.replace("_", "-"))


def _default_prog() -> str:
    """How the user started this command: 'python -m minibert.X' for a module of the package
    (sys.argv[0] is then the module's file), else the script's name as typed."""
    called = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("minibert")
    if called.suffix == ".py" and called.resolve().parent == Path(__file__).resolve().parent:
        return f"python -m minibert.{called.stem}"
    return called.name


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser that accepts --a-b and --a_b alike and raises MinibertError.

    Abbreviated flags are off (allow_abbrev=False): with both spellings accepted, a prefix
    could match two flags, and a flag added later would change what an old prefix means."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        if kwargs.get("prog") is None and not args:
            kwargs["prog"] = _default_prog()
        super().__init__(*args, **kwargs)
        self._typed: dict[str, str] = {}  # declared flag -> the spelling the user typed

    def normalize(self, argv: list[str]) -> list[str]:
        """argv with every flag in its declared spelling ("--" ends the flags)."""
        declared = self._option_string_actions
        out = []
        for i, arg in enumerate(argv):
            if arg == "--":
                return out + argv[i:]
            flag, eq, value = arg.partition("=")
            if flag.startswith("--") and flag not in declared:
                other = _other_spelling(flag)
                if other in declared:
                    self._typed[other] = flag
                    arg = other + eq + value
            out.append(arg)
        return out

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self.normalize(args), namespace)

    unknown_noun = "option"  # what an unknown flag is called in the error: "unknown option --x"

    def unknown_flag(self, typed: str) -> MinibertError:
        """'unknown option --tpo-k (did you mean --top-k?)', the hint spelled like `typed`."""
        flags = [f for f in self._option_string_actions if f.startswith("--")]
        if "-" in typed.lstrip("-"):  # suggest in the user's spelling: --batch-sise -> --batch-size
            flags = ["--" + f[2:].replace("_", "-") for f in flags]
        elif "_" in typed:
            flags = ["--" + f[2:].replace("-", "_") for f in flags]
        close = difflib.get_close_matches(typed, flags, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return MinibertError(f"command line: unknown {self.unknown_noun} {typed}{hint}")

    def error(self, message: str):  # type: ignore[override]
        unknown = re.match(r"unrecognized arguments: (--?[^\s=]+)", message)
        if unknown:
            raise self.unknown_flag(unknown.group(1))
        for declared, typed in self._typed.items():  # name the flag as the user typed it
            message = re.sub(rf"(?<![\w-]){re.escape(declared)}(?![\w-])", typed, message)
        raise MinibertError(f"command line: {message}")


def read_sentences(file: Path) -> list[tuple[str, str]]:
    """(FILE:LINE, sentence) for each non-blank line of the file, stripped."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise MinibertError(f"{file}: cannot read sentences ({error})") from None
    return [(f"{file}:{number}", line.strip())
            for number, line in enumerate(lines, start=1) if line.strip()]


def report_failures(results: list[dict], sources: list[str]) -> int:
    """Print 'error: SOURCE: message' on stderr for each result that holds an "error" (and add
    the source to that error object, for --json); return how many there were."""
    failed = 0
    for result, source in zip(results, sources, strict=True):
        if "error" in result:
            failed += 1
            result["error"] = {"source": source, **result["error"]}
            print(f"error: {source}: {result['error']['message']}", file=sys.stderr)
    return failed
