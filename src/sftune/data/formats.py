"""Data formats: how one dataset row becomes text segments, each trained on or not.

    text                    {"text": "a fine film"}                                   all trained
    prompt_completion       {"prompt": "Q: 2+2? A:", "completion": " 4"}              completion (+ EOS) trained
    chat                    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
                                                                                      assistant turns trained
                            (or ShareGPT's {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]})
    chat_prompt_completion  {"prompt": [messages...], "completion": [messages...]}   the completion's turns trained

A row becomes a list of `(text, trained)` segments. The data pipeline tokenizes
each segment on its own and concatenates the ids, so the boundary between
prompt and answer is exact even where BPE would merge across it (that is also
what the model sees at generation time: the prompt is tokenized alone).

    >>> row_segments({"prompt": "Q: hi", "completion": " A: yo"}, Layout("prompt_completion", {"prompt": "prompt", "completion": "completion"}))
    [('Q: hi', False), (' A: yo', True)]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sftune.data.templates import ChatTemplate, TemplateRefusal, check_template_writes
from sftune.errors import SftuneError

FORMATS = ("text", "prompt_completion", "chat", "chat_prompt_completion")
COLUMN_KEYS = ("text", "prompt", "completion", "input", "messages", "tools")
ROLES = ("system", "user", "assistant", "tool")
# Other names of the roles in `messages` (Gemini's and Gemma's `model`; ShareGPT's names written as roles), read as
# Axolotl's chat_template datasets read them by default.
ROLE_ALIASES = {"model": "assistant", "gpt": "assistant", "human": "user"}
# What a message may hold besides role and content, passed to the template as given (OpenAI's and TRL's names).
MESSAGE_KEYS = ("tool_calls", "name", "tool_call_id", "reasoning_content", "thinking", "reasoning")
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # one field under its several names
CHAT_COLUMNS = ("messages", "prompt", "completion", "tools")  # a chat layout's columns of structured data
ROW_COLUMN = "__row__"  # the row's number in its source split, added by load_rows for error messages

# How the optional `input` field of alpaca-style data joins the prompt (when non-empty).
INPUT_JOIN = "{prompt}\n\n{input}"
# Well-known instruction datasets' columns (prompt, completion, input): alpaca's, dolly's; named in the error of a
# dataset whose text column cannot be told, with the --columns mapping that reads them.
INSTRUCTION_LAYOUTS = (("instruction", "output", "input"), ("instruction", "response", "context"),
                       ("question", "answer", None), ("prompt", "response", None), ("query", "response", None))


@dataclass(frozen=True)
class Layout:
    """Which format a dataset is in, and which column plays each part."""

    format: str
    columns: dict[str, str]  # part ("text", "prompt", "completion", "input", "messages") -> column name

    def describe(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in self.columns.items())
        return f"{self.format} ({parts})" if parts else self.format

    @property
    def is_chat(self) -> bool:
        """Chat data (rendered with a chat template), alone or among the datasets of a mixture."""
        return any(f.startswith("chat") for f in self.format.split("+"))


def mixture_layout(layouts: list[Layout]) -> Layout:
    """The layout of several datasets trained together: their formats joined by "+" (once each), and their
    columns where all agree.

    >>> mixture_layout([Layout("chat", {"messages": "m"}), Layout("text", {"text": "t"})]).describe()
    'chat+text'
    """
    formats = list(dict.fromkeys(layout.format for layout in layouts))
    columns = layouts[0].columns if all(layout.columns == layouts[0].columns for layout in layouts) else {}
    return Layout("+".join(formats), dict(columns))


def parse_columns(value: str | dict[str, str] | None) -> dict[str, str]:
    """`"prompt=instruction,completion=output"` (or a YAML mapping) -> {"prompt": "instruction", ...}.

    >>> parse_columns("prompt=instruction, completion=output")
    {'prompt': 'instruction', 'completion': 'output'}
    """
    if not value:
        return {}
    if isinstance(value, dict):
        items = list(value.items())
    else:
        items = [(pair.partition("=")[0].strip(), pair.partition("=")[2].strip()) for pair in value.split(",") if pair.strip()]
    mapping = {}
    for key, column in items:
        if key not in COLUMN_KEYS:
            raise SftuneError(f"columns: unknown part {key!r}; parts are {', '.join(COLUMN_KEYS)} "
                              f"(e.g. --columns prompt=instruction,completion=output)")
        if not column:
            raise SftuneError(f"columns: part {key!r} names no column; write {key}=COLUMN (--columns)")
        mapping[key] = str(column)
    return mapping


def _is_list(feature: Any) -> bool:
    import datasets

    return isinstance(feature, (list, datasets.Sequence, getattr(datasets, "List", ())))


def detect_layout(features: dict[str, Any], requested: str = "auto", columns: dict[str, str] | None = None,
                  text_column: str | None = None) -> Layout:
    """The dataset's format: `requested`, else from the (mapped) column names.

    `features` maps column names to datasets feature objects. A `messages`
    column means chat; `prompt` and `completion` mean prompt/completion (chat
    prompt/completion when they hold message lists); anything else is text.
    """
    columns = dict(columns or {})
    if text_column is not None:
        columns.setdefault("text", text_column)
    names = [n for n in features if n != ROW_COLUMN]
    for key, column in columns.items():
        if column not in features:
            what = "text column" if key == "text" else f"column {column!r} (for {key}) is"
            raise SftuneError(f"{what}{f' {column!r}' if key == 'text' else ''} not in the dataset "
                              f"(columns: {', '.join(names)}); fix {'--text-column or ' if key == 'text' else ''}--columns")
    col = {k: columns.get(k, k) for k in COLUMN_KEYS}
    if "messages" not in columns and "messages" not in features and "conversations" in features:
        col["messages"] = "conversations"  # the ShareGPT layout
    fmt = requested
    if fmt == "auto":
        if col["messages"] in features and "text" not in columns:
            fmt = "chat"
        elif col["prompt"] in features and col["completion"] in features and "text" not in columns:
            fmt = "prompt_completion"
        else:
            fmt = "text"
    if fmt == "prompt_completion" and all(c in features for c in (col["prompt"], col["completion"])) \
            and _is_list(features[col["prompt"]]):
        fmt = "chat_prompt_completion"
    needed = {"text": [], "prompt_completion": ["prompt", "completion"], "chat": ["messages"],
              "chat_prompt_completion": ["prompt", "completion"]}[fmt]
    uses = {"text": ("text",), "prompt_completion": ("prompt", "completion", "input"), "chat": ("messages", "tools"),
            "chat_prompt_completion": ("prompt", "completion", "tools")}[fmt]
    unused = [f"{k}={columns[k]}" for k in columns if k not in uses and not (k == "text" and text_column)]
    if unused:  # (a part mapped for another format: a mistake, or a half-mapped pair)
        raise SftuneError(f"--columns {','.join(unused)}: format {fmt} does not use "
                          f"{' or '.join(k.split('=')[0] for k in unused)} (its parts: {', '.join(uses)}); for "
                          f"prompt/completion data map both, e.g. --columns prompt=instruction,completion=output, or "
                          f"set --format")
    missing = [f"{k} (column {col[k]!r})" for k in needed if col[k] not in features]
    if missing:
        example = "messages=conversation" if fmt == "chat" else "prompt=instruction,completion=output"
        raise SftuneError(f"format {fmt} needs {', '.join(missing)}, not in the dataset (columns: {', '.join(names)}); "
                          f"map them with --columns, e.g. --columns {example}, or set --format")
    if fmt == "text":
        try:
            return Layout("text", {"text": find_text_column({n: features[n] for n in names}, columns.get("text"))})
        except SftuneError:
            if requested == "text" and col["messages"] in features:  # (no text column beside the conversations)
                raise SftuneError(f"--format text: the dataset holds conversations (column {col['messages']!r}), "
                                  f"not text; leave out --format (auto reads them as chat), or name a text column "
                                  f"with --text-column") from None
            raise
    chosen = {k: col[k] for k in needed}
    if fmt == "prompt_completion" and col["input"] in features:
        chosen["input"] = col["input"]
    if fmt.startswith("chat") and col["tools"] in features:
        chosen["tools"] = col["tools"]
    return Layout(fmt, chosen)


def validate_messages(messages: Any, where: str, final_assistant: bool = True) -> list[dict]:
    """Check a conversation: a non-empty list of {role, content} with known roles, ending with
    the assistant (when `final_assistant`). Errors name the row and the message."""
    if not isinstance(messages, list) or not messages:
        raise SftuneError(f"{where}: empty conversation (no messages); remove the row or fix the data")
    out = [_message(_from_sharegpt(m), f"{where}, message {k}") for k, m in enumerate(messages)]
    if final_assistant and out[-1]["role"] != "assistant":
        raise SftuneError(f"{where}: the conversation ends with a {out[-1]['role']} turn, not an assistant turn "
                          f"(message {len(out) - 1}); nothing to train on after it. Fix or remove the row")
    return out


def _message(m: Any, where: str) -> dict:
    """One message, checked, as the template gets it: role and content, and the MESSAGE_KEYS it has (tool calls,
    a tool's name, reasoning). Keys whose value is None are dropped (a table fills them in for every message that
    lacks them, and templates test `'tool_calls' in message`); reasoning goes under each of its names, as
    transformers passes it; an assistant turn's `weight` (0 or 1) is kept for `row_segments`."""
    if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
        raise SftuneError(f"{where}: expected {{role, content}}, got {m!r:.80}")
    if m["role"] in ROLE_ALIASES:
        m = {**m, "role": ROLE_ALIASES[m["role"]]}
    if m["role"] not in ROLES:
        raise SftuneError(f"{where}: unknown role {m['role']!r}; roles are {', '.join(ROLES)} (and "
                          f"{', '.join(f'{a} for {r}' for a, r in ROLE_ALIASES.items())})")
    calls = m.get("tool_calls")
    if calls is not None and (not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)):
        raise SftuneError(f"{where}: tool_calls must be a list of {{type, function: {{name, arguments}}}}, "
                          f"got {calls!r:.80}")
    content = _text_blocks(m.get("content"), where)
    if not isinstance(content, str) and not (content is None and calls):
        raise SftuneError(f"{where}: content must be text, got {type(content).__name__}")
    weight = m.get("weight")
    if weight is not None and (m["role"] != "assistant" or weight not in (0, 1) or isinstance(weight, str)):
        raise SftuneError(f"{where}: weight {weight!r} on a {m['role']} message; weight is 0 (do not train this "
                          f"assistant turn) or 1 (train it), on assistant messages only")
    message = {"role": m["role"], "content": content, **({"weight": int(weight)} if weight is not None else {})}
    message.update({key: m[key] for key in MESSAGE_KEYS if m.get(key) is not None})
    reasoning = next((message[key] for key in REASONING_KEYS if key in message), None)
    if reasoning is not None:
        message.update({"thinking": reasoning, "reasoning_content": reasoning})
    return message


def _text_blocks(content: Any, where: str) -> Any:
    """Content given as a list of text blocks (`[{"type": "text", "text": ...}]`, the multimodal layout) as the
    text they hold, joined as vision templates join them: many text templates would write the list's Python repr
    (Llama 3.1) or nothing (Qwen3) instead. Other content is returned as it is."""
    if not isinstance(content, list):
        return content
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text" or not isinstance(block.get("text"), str):
            raise SftuneError(f"{where}: content block {str(kind or block)!r:.40} is not text; sftune trains "
                              f"language models on text: give content as text or text blocks")
    return "".join(block["text"] for block in content)


def row_tools(value: Any, where: str) -> list[dict] | None:
    """A row's tools: JSON schemas, as a list (or the JSON text of one, as older datasets stored them)."""
    if isinstance(value, str) and value:
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise SftuneError(f"{where}: the tools column is text but not JSON ({e}); give a list of JSON "
                              f"schemas") from None
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise SftuneError(f"{where}: tools must be a list of JSON schemas ({{type: function, function: {{name, "
                          f"description, parameters}}}}), got {value!r:.80}")
    return value


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
                  "observation": "tool"}


def _from_sharegpt(message: Any) -> Any:
    """A ShareGPT message {from: human|gpt|system, value} as {role, content}; others unchanged. LLaMA-Factory's tool
    turns: `function_call` (value: the JSON of a call {name, arguments}, or of a list of them) is an assistant
    message with those tool calls, `observation` a tool's answer."""
    if not (isinstance(message, dict) and message.get("role") is None and "from" in message and "value" in message):
        return message
    if message["from"] == "function_call":
        try:
            calls = json.loads(message["value"])
        except (TypeError, json.JSONDecodeError):
            return {"role": "assistant", "content": None, "tool_calls": message["value"]}  # refused as malformed
        calls = calls if isinstance(calls, list) else [calls]
        return {"role": "assistant", "content": None,
                "tool_calls": [{"type": "function", "function": c} if isinstance(c, dict) else c for c in calls]}
    return {"role": SHAREGPT_ROLES.get(message["from"], message["from"]), "content": message["value"]}


def _as_text(value: Any) -> Any:
    """An integer cell (a CSV column of plain integers is read as numbers) as the text it was written as."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# --- one row -----------------------------------------------------------------------


def row_segments(row: dict, layout: Layout, template: ChatTemplate | None = None, train_on_prompt: bool = False,
                 train_on_all_turns: bool = False, where: str = "row") -> list[tuple[str, bool]]:
    """The row's text as `(text, trained)` segments, per its layout.

    >>> row_segments({"instruction": "Add 2+2.", "ctx": "", "output": " 4"},
    ...              Layout("prompt_completion", {"prompt": "instruction", "completion": "output", "input": "ctx"}))
    [('Add 2+2.', False), (' 4', True)]
    """
    c = layout.columns
    check_one_format(row, layout, where)
    if layout.format == "text":
        text = _as_text(row[c["text"]])
        if text is not None and not isinstance(text, str):
            raise SftuneError(f"{where}: column {c['text']!r} holds {type(text).__name__}, not text; choose the text "
                              f"column with --text-column, or --format and --columns for other layouts")
        return [(text or "", True)]
    if layout.format == "prompt_completion":
        prompt, completion = (_as_text(row[c[k]]) for k in ("prompt", "completion"))
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise SftuneError(f"{where}: prompt and completion must be text, got {type(prompt).__name__} and "
                              f"{type(completion).__name__} (check --format and --columns)")
        extra = row.get(c["input"]) if "input" in c else None
        if extra:
            prompt = INPUT_JOIN.format(prompt=prompt, input=extra)
        return [(prompt, train_on_prompt), (completion, True)]
    if template is None:
        raise AssertionError("chat formats need a ChatTemplate")
    if layout.format == "chat":
        messages = validate_messages(_structured(row[c["messages"]], c["messages"], where), where)
        n_prompt = 0
    else:
        prompt = validate_messages(_structured(row[c["prompt"]], c["prompt"], where), f"{where} (prompt)",
                                   final_assistant=False)
        completion = validate_messages(_structured(row[c["completion"]], c["completion"], where),
                                       f"{where} (completion)")
        messages, n_prompt = prompt + completion, len(prompt)
    tools = row_tools(row.get(c["tools"]), where) if "tools" in c else None
    if tools and template.tool_use is not None:
        template = template.tool_use

    def trained(i: int, message: dict) -> bool:
        if message.get("weight") == 0:  # OpenAI's fine-tuning format: an assistant turn shown but not trained
            return False
        if train_on_all_turns or (train_on_prompt and i < n_prompt):
            return True
        return message["role"] == "assistant" and i >= n_prompt

    try:
        parts = template.segments(messages, trained, tools)
        if tools or any("tool_calls" in m for m in messages):
            check_template_writes(template, messages, tools, where)
        return parts
    except SftuneError:
        raise
    except TemplateRefusal as e:
        raise SftuneError(f"{where}: the chat template refuses this conversation ({e}); fix or remove the row, "
                          f"or use another template (--chat-template FILE)") from None
    except Exception as e:  # a Jinja error or a template that rewrites earlier turns
        raise SftuneError(f"{where}: the chat template cannot be split into turns exactly ({e}); "
                          f"use a template that writes each assistant turn the same way whatever follows it "
                          f"(--chat-template FILE)") from None


def _structured(cell: Any, column: str, where: str) -> Any:
    """A conversation cell: as stored, or parsed from the JSON text of one (how some datasets store them, and how
    a stream's chunks carry them)."""
    if not isinstance(cell, str):
        return cell
    try:
        return json.loads(cell)
    except json.JSONDecodeError:
        raise SftuneError(f"{where}: column {column!r} holds text that is not a JSON list of messages; give "
                          f"messages as [{{role, content}}, ...] (check --format and --columns)") from None


FORMAT_PARTS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "chat": ("messages",),
                "chat_prompt_completion": ("prompt", "completion")}


def check_one_format(row: dict, layout: Layout, where: str) -> None:
    """A row whose own format's columns are empty while another format's are filled: the data mixes formats
    (a JSONL file with chat rows and prompt/completion rows reads as one table with empty cells)."""
    own = [layout.columns[k] for k in FORMAT_PARTS[layout.format] if k in layout.columns]
    if not own or any(row.get(col) not in (None, "") for col in own):
        return
    others = {"messages": "chat (messages)", "conversations": "chat (conversations)",
              "prompt": "prompt/completion", "completion": "prompt/completion", "text": "text"}
    found = sorted({what for col, what in others.items() if col not in own and row.get(col) not in (None, "", [])})
    if found:
        raise SftuneError(f"{where}: the data mixes formats: this row is {' and '.join(found)} while the dataset "
                          f"was read as {layout.format} ({layout.describe()}); give rows of one format (one file "
                          f"per format), or pick one with --format and --columns")


def find_text_column(columns: dict[str, Any], requested: str | None) -> str:
    """The column to train on: `requested`, else 'text', else 'sentence', else the only string column.

    `columns` maps column names to datasets feature objects.
    """
    names = list(columns)
    if requested is not None:
        if requested not in columns:
            raise SftuneError(f"text column {requested!r} not in the dataset (columns: {', '.join(names)}); fix --text-column")
        return requested
    for name in ("text", "sentence"):
        if name in columns:
            return name
    strings = [n for n, f in columns.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    pair = ""
    known = next(((p, c, i) for p, c, i in INSTRUCTION_LAYOUTS if p in strings and c in strings), None)
    if known is not None:  # alpaca's, dolly's, ... columns: prompt/completion data under other names
        prompt, completion, extra = known
        mapped = f"prompt={prompt},completion={completion}" + (f",input={extra}" if extra in strings else "")
        pair = (f"; or, as these look like prompt/completion data, --columns {mapped} (the completion is trained; "
                f"the prompt{f', with a non-empty {extra} after a blank line,' if extra in strings else ''} is joined "
                f"to it as written)")
    elif len(strings) == 2:  # e.g. question/answer: prompt/completion data under other names
        pair = (f"; for prompt/completion data, map the pair: --columns prompt={strings[0]},completion={strings[1]} "
                f"(or the other way round)")
    raise SftuneError(
        f"cannot tell which column holds the text (string columns: {', '.join(strings) or 'none'}; "
        f"all columns: {', '.join(names)}); set --text-column{pair}"
    )
