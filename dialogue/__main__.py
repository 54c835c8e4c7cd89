"""``python -m dialogue FILE`` (or ``-`` for stdin): print the parsed dialogue as JSON: the detected
``format`` (tags, roles, letters, names, free, chat, list, screenplay) and ``labels``, the speakers, and
each turn's ``text`` (subtitle), ``speech_text`` (what is said), ``directions``, ``pause_after`` and ``line``.

Exit status: 0 on success, 2 when the script is invalid or the file cannot be read (message on stderr,
``error: line N: ...`` when the line is known).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dialogue.schema import ScriptLimits
from dialogue.script import parse_script

logger = logging.getLogger(__name__)

EXIT_INVALID = 2


def _read(path: str) -> str:
    """The script as text: UTF-8 (a BOM is allowed), or UTF-16 with a BOM (what Windows Notepad may save).

    Raises OSError or UnicodeDecodeError.
    """
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        with open(path, "rb") as handle:
            data = handle.read()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    return data.decode("utf-8-sig")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dialogue",
        description="Parse a two-person dialogue script and print it as JSON (detected format, speakers, "
        "turns with speech text and directions).",
    )
    parser.add_argument("file", help="script file (UTF-8), or - to read standard input")
    defaults = ScriptLimits()
    parser.add_argument("--max-chars", type=int, default=defaults.max_chars, help="limit on the whole script")
    parser.add_argument(
        "--max-turns", type=int, default=defaults.max_turns, help="limit on the number of turns"
    )
    args = parser.parse_args(argv)

    try:
        text = _read(args.file)
    except UnicodeDecodeError as exc:
        print(
            f"error: cannot read {args.file}: not UTF-8 text ({exc.reason} at byte {exc.start})",
            file=sys.stderr,
        )
        return EXIT_INVALID
    except OSError as exc:
        print(f"error: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INVALID

    try:
        limits = ScriptLimits(max_chars=args.max_chars, max_turns=args.max_turns)
        dialogue = parse_script(text, limits)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    # UTF-8 whatever the console's locale says: the JSON keeps Chinese as characters (ensure_ascii=False).
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")
    print(json.dumps(dialogue.to_dict(), ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
