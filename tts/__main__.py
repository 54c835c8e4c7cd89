"""Command line for the speech stage.

    python -m tts --script FILE --voices VOICE1,VOICE2 --kokoro-dir DIR --out DIR [--gap 0.25] [--seed 0]
    python -m tts --audio1 FILE [--audio2 FILE] --mode add|para --out DIR
    python -m tts make-tiny --out DIR [--seed 0]
    python -m tts voices

The first two write speaker1.wav, speaker2.wav, mix.wav, subtitles.srt, subtitles.vtt and
timeline.json into --out. Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dialogue.schema import ScriptError


def _speech_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tts",
        description="Dialogue script -> two speaker tracks, mix and subtitles (Kokoro, local weights), "
        "or two recordings -> the same files. Subcommands: 'make-tiny', 'voices'.",
    )
    p.add_argument("--script", type=Path, help="dialogue script file (UTF-8)")
    p.add_argument("--voices", help="two voice ids, speaker 1 then speaker 2, e.g. af_heart,am_adam")
    p.add_argument("--kokoro-dir", type=Path, default=Path("weights/Kokoro-82M"), help="local Kokoro folder")
    p.add_argument("--device", default="cpu", help="torch device for Kokoro (cpu, cuda, cuda:N)")
    p.add_argument("--gap", type=float, default=0.25, help="seconds of silence between turns")
    p.add_argument("--seed", type=int, default=0, help="seed for Kokoro's vocoder noise")
    p.add_argument("--speed", type=float, default=1.0, help="speech speed factor (0.25..4)")
    p.add_argument("--audio1", type=Path, help="recording of person 1 (wav, flac, mp3, m4a, ogg)")
    p.add_argument("--audio2", type=Path, help="recording of person 2 (optional)")
    p.add_argument("--mode", default="add", help="add: person 1 then person 2; para: simultaneous")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


def _make_tiny(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tts make-tiny", description="write a random-weight Kokoro folder"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from tts.tiny import write_tiny_kokoro

    path = write_tiny_kokoro(args.out, seed=args.seed)
    print(f"tiny Kokoro (random weights) in {path}")
    return 0


def _list_voices() -> int:
    from tts.voices import voices_by_language

    for language, voices in voices_by_language().items():
        print(f"{language}:")
        for v in voices:
            print(f"  {v.id:<14} {v.gender:<6} {v.description}")
    return 0


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tts.timeline import build_timeline
    from tts.user_audio import timeline_from_files

    if args.script is not None and (args.audio1 is not None or args.audio2 is not None):
        parser.error("give either --script (with --voices) or --audio1/--audio2, not both")
    if args.script is not None:
        if not args.voices:
            parser.error("--script needs --voices VOICE1,VOICE2")
        voices = tuple(v.strip() for v in args.voices.split(","))
        if len(voices) != 2 or not all(voices):
            parser.error(f"--voices needs exactly two comma-separated voice ids, got {args.voices!r}")
        from tts.voices import get_voice

        for v in voices:
            get_voice(v)
        try:
            text = args.script.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"script: cannot read {args.script}: {exc}") from None
        from dialogue import parse_script

        dialogue = parse_script(text)
        from tts.engine import KokoroEngine

        engine = KokoroEngine(args.kokoro_dir, device=args.device)
        timeline = build_timeline(dialogue, voices, engine, gap_s=args.gap, seed=args.seed, speed=args.speed)
    elif args.audio1 is not None:
        timeline = timeline_from_files(args.audio1, args.audio2, args.mode)
    else:
        parser.error("nothing to do: give --script FILE --voices V1,V2, or --audio1 FILE [--audio2 FILE]")
    written = timeline.write(args.out)
    print(
        f"{timeline.duration:.2f} s, {len(timeline.turns)} turns, {timeline.num_frames(25)} frames at 25 fps"
    )
    for path in written.values():
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["make-tiny"]:
            return _make_tiny(argv[1:])
        if argv[:1] == ["voices"]:
            return _list_voices()
        parser = _speech_parser()
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
        return _run(args, parser)
    except ScriptError as exc:  # "line N: message"
        print(f"error: script: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # InputError says "<field>: <message>" itself
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
