"""Chat templates: rendering a conversation exactly as `apply_chat_template` does, and cutting it into turns.

    >>> t = ChatTemplate(DEFAULT_CHAT_TEMPLATE, type("Tok", (), {"eos_token": "<|endoftext|>"})())
    >>> t.segments([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], lambda i, m: i == 1)
    [('<|user|>\\nHi<|endoftext|>', False), ('<|assistant|>\\n', False), ('Yo<|endoftext|>', True)]
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable

from sftune.errors import SftuneError

# GPT-2 and other base models ship no chat template. This one is deliberately plain:
#   <|system|>\n{content}<|endoftext|><|user|>\n{content}<|endoftext|><|assistant|>\n{content}<|endoftext|>
# Each turn ends with the EOS token, so a model trained on it stops after its answer. Tools, when a row has
# them, come first as a `<|tools|>` turn of JSON schemas; an assistant's tool calls follow its content, one
# `<tool_call>{"name": ..., "arguments": ...}</tool_call>` line each; a tool's answer is a `<|tool|>` turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|tools|>\n' }}{% for tool in tools %}{{ tool | tojson }}{{ '\n' if not loop.last }}"
    "{% endfor %}{{ eos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] or [] %}{% set call = call['function'] or call %}"
    "{{ '\n' if loop.first and message['content'] }}{{ '\n' if not loop.first }}"
    "{{ '<tool_call>' + ({'name': call['name'], 'arguments': call['arguments']} | tojson) + '</tool_call>' }}"
    "{% endfor %}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


RENDER_LIMIT_S = 10.0  # the renders of one conversation; real templates take microseconds


class RenderTimeout(BaseException):
    """A render past its time limit. Not an `Exception`: the partial renders' `except Exception` (a template that
    cannot render a prefix of the conversation) must not take it for a refusal and go on without a limit."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise RenderTimeout in the block after `seconds` (SIGALRM; only in the main thread, else no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise RenderTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class TemplateRefusal(ValueError):
    """The chat template raised on a whole conversation: the data do not fit it (e.g. a system turn for a model
    without one)."""


class ChatTemplate:
    """A Jinja chat template, compiled once, rendered exactly as transformers'
    `apply_chat_template` renders it (same sandboxed environment, `{% generation %}`
    blocks, `tojson`, the tokenizer's special tokens as variables).

    We render it ourselves because finding exact turn boundaries takes many partial
    renders, including the empty conversation that `apply_chat_template` refuses.
    """

    def __init__(self, source: str, tokenizer):
        from jinja2.exceptions import TemplateError

        try:
            self.template = _compile(source)
        except TemplateError as e:
            raise SftuneError(f"the chat template does not compile: {e} (check --chat-template)") from None
        self.source = source
        self.tool_use: ChatTemplate | None = None  # a tokenizer's named `tool_use` template, for rows with tools
        self.variables = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.special_tokens = {t for t in [*self.variables.values(), *getattr(tokenizer, "all_special_tokens", []),
                                           *(getattr(a, "content", a) for a in added.values())]
                               if isinstance(t, str) and t}
        self._timed = False  # inside `limited`: its one alarm covers every render

    def __getstate__(self) -> dict:
        """Pickled (for --data-workers' processes) without the compiled template, which does not pickle."""
        state = dict(self.__dict__)
        del state["template"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.template = _compile(self.source)

    @contextlib.contextmanager
    def limited(self, messages: list[dict]):
        """RENDER_LIMIT_S for the renders of one conversation (`segments` renders it ~7 times to find its turns:
        one alarm for them all, not one a render, whose signal calls took 15% of a chat data set's tokenizing),
        said as sftune's error. Nested: the outer one's limit holds."""
        if self._timed:
            yield
            return
        self._timed = True
        try:
            with time_limit(RENDER_LIMIT_S):
                yield
        except RenderTimeout:
            raise SftuneError(f"the chat template took more than {RENDER_LIMIT_S:g} s to render one conversation "
                              f"of {len(messages)} message(s): does it loop without bound? Fix the template "
                              f"(--chat-template)") from None
        finally:
            self._timed = False

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
        """The template's text, with what `apply_chat_template` passes it (tools, no documents)."""
        with self.limited(messages):
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                        documents=None, **self.variables)

    def render_empty(self, tools: list[dict] | None = None) -> str:
        """What the template writes for no message at all (a BOS before the first, or Phi-3's closing EOS after
        the last), '' if it needs a message."""
        try:
            return self.render([], tools=tools)
        except Exception:
            return ""

    def segments(self, messages: list[dict], trained: Callable[[int, dict], bool],
                 tools: list[dict] | None = None) -> list[tuple[str, bool]]:
        """Cut the rendered conversation into turns, each `(text, trained)`.

        The text is the conversation as the template renders it (`apply_chat_template`'s text): each message's
        part is what rendering it adds to the messages before it, and what the template writes before any
        message (a BOS) comes first, untrained. An assistant turn is split once more: its header (what
        `add_generation_prompt` writes, as far as the rendered turn opens with it) is never trained; the rest,
        its content and end-of-turn marker, is trained when `trained(i, message)` says so. An untrained message
        that the template cannot render on its own (some templates need a user turn first) joins the next part.

        Templates that write something after the last message (Phi-3's EOS) keep it at the end. Templates that
        render an earlier assistant turn differently from the last one (Qwen3 and other reasoning models drop
        earlier turns' thinking) get each assistant turn as the template renders it when it is the last one,
        that is as the model generates it, with the rest of the conversation as rendered (what TRL's training
        templates do by hand). Raises ValueError when the renders cannot be matched up that way.
        `tools` (JSON schemas) go to every render, as `apply_chat_template(..., tools=...)` passes them.
        """
        with self.limited(messages):
            return self._segments(messages, trained, tools)

    def _segments(self, messages: list[dict], trained: Callable[[int, dict], bool],
                  tools: list[dict] | None) -> list[tuple[str, bool]]:
        try:
            full = self.render(messages, tools=tools)
        except SftuneError:
            raise
        except Exception as e:  # the template's own raise_exception ("System role not supported"), or a Jinja error
            raise TemplateRefusal(str(e)) from None
        if messages and not full:
            raise ValueError("the template renders nothing")
        empty = self.render_empty(tools)
        closing = empty if empty and not full.startswith(empty) and full.endswith(empty) else ""
        out: list[tuple[str, bool]] = []
        pos = 0  # how much of `full` the parts so far cover
        if empty and full.startswith(empty):
            out.append((empty, False))
            pos = len(empty)
        for i, message in enumerate(messages):
            train = trained(i, message)
            if message["role"] != "assistant":
                end = self._prefix_end(messages[: i + 1], full, closing, pos, tools)
                if end is not None:
                    out.append((full[pos:end], train))
                    pos = end
                elif train:
                    raise ValueError(f"rendering message {i} changes the text of earlier messages")
                continue
            header = self.render(messages[:i], add_generation_prompt=True, tools=tools)
            start = _common_prefix(header, full)
            if start < pos:
                raise ValueError(f"the generation prompt before message {i} changes earlier text")
            out.append((full[pos:start], False))
            pos = start
            end = self._prefix_end(messages[: i + 1], full, closing, pos, tools)
            if end is not None:
                out.append((full[pos:end], train))
                pos = end
            else:  # the template writes this turn otherwise when another follows: train it as generated
                pos, rest_of_header, text = self._as_generated(messages, i, header, full, closing, start, tools)
                out += [(rest_of_header, False), (text, train)]
        out.append((full[pos:], False))  # nothing, unless the last messages could not be split off
        return [(text, train) for text, train in out if text]

    def _prefix_end(self, messages: list[dict], full: str, closing: str, pos: int,
                    tools: list[dict] | None) -> int | None:
        """Where the render of `messages` (the first few of the conversation) ends in `full`, else None."""
        try:
            part = self.render(messages, tools=tools)
        except Exception:
            return None
        if closing and part.endswith(closing) and len(part) < len(full):
            part = part[: len(part) - len(closing)]
        elif not full.startswith(part):
            part = part[: self._closing_start(part, full)]
        return len(part) if len(part) >= pos and full.startswith(part) else None

    def _closing_start(self, part: str, full: str) -> int:
        """Where `part` (a render of the first messages) stops agreeing with `full`, when what follows there is
        only special tokens that also end `full`: a closing the template writes after the last message (Phi-3's
        EOS) that rendering no message at all did not show. Else len(part)."""
        k = _common_prefix(part, full)
        for token in self.special_tokens:  # back to the start of a special token the agreement ends inside
            for j in range(max(0, k - len(token) + 1), k):
                if part.startswith(token, j):
                    k = j
                    break
        rest = part[k:]
        while rest:
            token = next((t for t in self.special_tokens if rest.startswith(t)), None)
            if token is None and not rest[0].isspace():
                return len(part)
            rest = rest[len(token) if token else 1:]
        return k if part[k:] and full.endswith(part[k:]) else len(part)

    def _as_generated(self, messages: list[dict], i: int, header: str, full: str, closing: str,
                      start: int, tools: list[dict] | None) -> tuple[int, str, str]:
        """Assistant turn i of a template that writes it otherwise once other turns follow: the rest of its
        header and its text as rendered when it is the last turn (the generation prompt, then what the model
        generates), and where its rewritten form ends in `full` (found by appending a marker to its content:
        the end-of-turn text that follows the content must be the same in both). `full[:start]` is the
        conversation up to this turn, as far as it agrees with the generation prompt."""
        alone = self.render(messages[: i + 1], tools=tools)
        if closing and alone.endswith(closing):
            alone = alone[: len(alone) - len(closing)]
        try:
            context = self.render(messages[:i], tools=tools)
        except Exception:
            context = ""
        if closing and context.endswith(closing):
            context = context[: len(context) - len(closing)]
        opened = _common_prefix(header, alone)  # the generation prompt, as far as the turn opens with it
        if opened < start or not (full.startswith(context) and header.startswith(context)):
            raise ValueError(f"the text before message {i} changes when it is the last message")
        marked = [*messages[:i], {**messages[i], "content": (messages[i]["content"] or "") + CONTENT_MARK}]
        content_end = _common_prefix(alone, self.render(marked, tools=tools))
        full_content_end = _common_prefix(full, self.render(marked + messages[i + 1:], tools=tools))
        end_of_turn = alone[content_end:]
        if content_end < opened or full_content_end < start or not full.startswith(end_of_turn, full_content_end):
            raise ValueError(f"rendering the messages after message {i} changes its text beyond recognition")
        return full_content_end + len(end_of_turn), header[start:opened], alone[opened:]

    def rewrites_earlier_turns(self) -> bool:
        """Whether the template writes an assistant turn otherwise once more messages follow (Qwen3 drops an
        earlier turn's thinking), so that `segments` trains such turns as generated rather than as rendered."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello"},
                 {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes"}]
        try:
            parts = self.segments(probe, lambda i, m: m["role"] == "assistant")
            return "".join(text for text, _ in parts) != self.render(probe)
        except Exception:
            return False

    def end_of_turn(self) -> str:
        """What the template writes after an assistant's content ('' when nothing)."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        turn = "".join(t for t, trained in self.segments(probe, lambda i, m: m["role"] == "assistant") if trained)
        return turn.split("Hello", 1)[1] if "Hello" in turn else ""


CONTENT_MARK = "\ue000sftune\ue000"  # appended to a turn's content to find where the content ends in a render


def _common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of two strings."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _compile(source: str):
    """Compile with transformers' own environment when it offers it (identical renders), else an
    equivalent sandbox (trim_blocks, lstrip_blocks, raise_exception)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a private helper: if a transformers release drops it, render the same way ourselves
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        return env.from_string(source)
    return _compile_jinja_template(source)


def check_template_writes(template: ChatTemplate, messages: list[dict], tools: list[dict] | None,
                          where: str) -> None:
    """A template that drops a row's tool calls or tools would train answers on text without them."""
    calls = [k for k, m in enumerate(messages) if m.get("tool_calls")]
    if calls:
        bare = [{key: value for key, value in m.items() if key != "tool_calls"} for m in messages]
        if template.render(bare, tools=tools) == template.render(messages, tools=tools):
            raise SftuneError(f"{where}, message {calls[0]}: the chat template does not write tool calls, so the "
                              f"model would learn empty answers; use a template that does (--chat-template FILE; "
                              f"sftune's default writes them)")
    if tools and template.render(messages) == template.render(messages, tools=tools):
        raise SftuneError(f"{where}: the chat template does not write the row's tools, so the model would learn "
                          f"calls to tools it was never shown; use a template that does (--chat-template FILE; "
                          f"sftune's default writes them)")
