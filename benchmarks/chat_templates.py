"""Which real models' chat templates sftune splits into trained turns, and how.

Renders three conversations (one turn; a system turn and two turns; two turns with thinking blocks) with each
template in a directory and cuts them as training does (`ChatTemplate.segments`, assistant turns trained).
Prints one row a template: `rendered` (the parts join to exactly what `apply_chat_template` writes),
`generated` (the template rewrites earlier assistant turns: they are trained as generated), or the error.

    pip download --no-deps trl==1.16.0 -d /tmp/trl && unzip -q -o /tmp/trl/trl-*.whl -d /tmp/trl
    python benchmarks/chat_templates.py /tmp/trl/trl/chat_templates      # TRL ships models' original templates

Templates named `*_training.jinja` (TRL's hand-edited ones) are skipped unless `--all`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

from sftune.data.templates import ChatTemplate

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}],
    "system + 2 turns": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Yes, again"}],
    "2 turns, thinking": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello there"},
        {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "<think>\nok\n</think>\n\nYes, again"}],
}
SPECIAL_TOKENS = SimpleNamespace(bos_token="<s>", eos_token="</s>", pad_token=None, unk_token=None)


def outcome(template: ChatTemplate, messages: list[dict]) -> str:
    try:
        parts = template.segments(messages, lambda i, m: m["role"] == "assistant")
    except Exception as e:
        return f"error: {str(e)[:60]}"
    if not any(trained for _, trained in parts):
        return "error: nothing trained"
    return "rendered" if "".join(text for text, _ in parts) == template.render(messages) else "generated"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="a directory of .jinja chat templates")
    parser.add_argument("--all", action="store_true", help="include *_training.jinja")
    args = parser.parse_args()
    paths = sorted(p for p in args.directory.glob("*.jinja") if args.all or not p.stem.endswith("_training"))
    if not paths:
        raise SystemExit(f"no .jinja templates in {args.directory}")
    print("| template | " + " | ".join(CONVERSATIONS) + " |")
    print("| --- |" + " --- |" * len(CONVERSATIONS))
    counts: dict[str, int] = {}
    for path in paths:
        template = ChatTemplate(path.read_text(), SPECIAL_TOKENS)
        row = [outcome(template, messages) for messages in CONVERSATIONS.values()]
        for r in row:
            counts[r.split(":")[0]] = counts.get(r.split(":")[0], 0) + 1
        print(f"| {path.stem} | " + " | ".join(row) + " |")
    print(f"\n{len(paths)} templates x {len(CONVERSATIONS)} conversations: "
          + ", ".join(f"{n} {what}" for what, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
