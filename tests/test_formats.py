"""Tier 1-2: data formats (prompt/completion, chat, chat prompt/completion) and their exact label masks.

Every expected `labels` list is written out token by token from the real GPT-2 tokenizer:
prompt tokens -100, answer tokens trained, EOS / end-of-turn trained, padding -100.
"""

import copy
import json
import re

import pytest

from sftune.batching import IGNORE_INDEX, best_fit_decreasing, collate, collate_packed, epoch_steps
from conftest import prepare
from sftune.errors import SftuneError
from sftune.data.formats import Layout, detect_layout, parse_columns, row_segments
from sftune.data.templates import DEFAULT_CHAT_TEMPLATE, ChatTemplate

EOS = 50256
X = IGNORE_INDEX


def write_splits(root, train_rows, validation_rows=None, name="data"):
    """A directory with train.jsonl and validation.jsonl: the splits are exactly these rows, in order."""
    d = root / name
    d.mkdir()
    for split, rows in (("train", train_rows), ("validation", validation_rows or train_rows)):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def labels_of(data, i=0, split="train"):
    examples = getattr(data, split)
    batch = collate(examples, [i], pad_id=EOS)
    return batch["input_ids"][0].tolist(), batch["labels"][0].tolist()


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def prep(tmp_path, tok, rows, **kw):
    kw.setdefault("min_tokens", 0)
    kw.setdefault("max_length", 128)
    return prepare(write_splits(tmp_path, rows), tok, cache_dir=tmp_path / "cache", **kw)


# --- prompt / completion -------------------------------------------------------------


def test_prompt_completion_trains_the_completion_and_its_eos(tmp_path, gpt2_tokenizer):
    row = {"prompt": "Q: What is 2+2?\nA:", "completion": " 4, of course."}
    data = prep(tmp_path, gpt2_tokenizer, [row])
    p, c = enc(gpt2_tokenizer, row["prompt"]), enc(gpt2_tokenizer, row["completion"])
    ids, labels = labels_of(data)
    assert ids == p + c + [EOS]
    assert labels == [X] * len(p) + c + [EOS]
    assert data.layout == Layout("prompt_completion", {"prompt": "prompt", "completion": "completion"})
    st = data.stats["train"]
    assert (st.supervised_tokens, st.untrained_tokens) == (len(c) + 1, len(p))


def test_train_on_prompt_trains_everything_after_the_first_token(tmp_path, gpt2_tokenizer):
    row = {"prompt": "Q: What is 2+2?\nA:", "completion": " 4"}
    data = prep(tmp_path, gpt2_tokenizer, [row], train_on_prompt=True)
    ids, labels = labels_of(data)
    assert labels == ids


def test_padding_is_never_trained(tmp_path, gpt2_tokenizer):
    rows = [{"prompt": "Say hi:", "completion": " hi"}, {"prompt": "Say hello there:", "completion": " hello there"}]
    data = prep(tmp_path, gpt2_tokenizer, rows)
    batch = collate(data.train, [0, 1], pad_id=EOS)
    short, long_ = batch["labels"][0].tolist(), batch["labels"][1].tolist()
    n = len(enc(gpt2_tokenizer, "Say hi:")) + len(enc(gpt2_tokenizer, " hi")) + 1
    assert short[n - 2:n] == [enc(gpt2_tokenizer, " hi")[-1], EOS]  # the real EOS is trained ...
    assert short[n:] == [X] * (len(long_) - n)  # ... the EOS used as padding is not
    assert batch["input_ids"][0, n:].tolist() == [EOS] * (len(long_) - n)


def test_boundary_merge_uses_the_parts_tokens(tmp_path, gpt2_tokenizer):
    """'hello wor' + 'ld' is 'hello world' (2 tokens) as one text, but 3 tokens as parts."""
    row = {"prompt": "hello wor", "completion": "ld"}
    whole = enc(gpt2_tokenizer, "hello world")
    p, c = enc(gpt2_tokenizer, "hello wor"), enc(gpt2_tokenizer, "ld")
    assert whole != p + c  # the case really merges across the boundary
    data = prep(tmp_path, gpt2_tokenizer, [row])
    ids, labels = labels_of(data)
    assert ids == p + c + [EOS]
    assert labels == [X] * len(p) + c + [EOS]  # exactly the completion's own tokens are trained
    assert data.stats["train"].boundary_merges == 1


def test_truncation_right_cuts_the_end_and_adds_no_eos(tmp_path, gpt2_tokenizer):
    row = {"prompt": "one two three four", "completion": " five six seven eight"}
    p, c = enc(gpt2_tokenizer, row["prompt"]), enc(gpt2_tokenizer, row["completion"])
    data = prep(tmp_path, gpt2_tokenizer, [row], max_length=6, overlong="truncate", truncation_side="right")
    ids, labels = labels_of(data)
    assert ids == (p + c)[:6] and EOS not in ids
    assert labels == [X] * len(p) + c[: 6 - len(p)]
    assert data.stats["train"].truncated == 1


def test_truncation_left_cuts_the_prompt_start_and_keeps_eos(tmp_path, gpt2_tokenizer):
    row = {"prompt": "one two three four", "completion": " five six"}
    p, c = enc(gpt2_tokenizer, row["prompt"]), enc(gpt2_tokenizer, row["completion"])
    data = prep(tmp_path, gpt2_tokenizer, [row], max_length=5, overlong="truncate", truncation_side="left")
    ids, labels = labels_of(data)
    assert ids == (p + c + [EOS])[-5:]
    assert labels == [X] * (5 - len(c) - 1) + c + [EOS]


def test_an_example_left_with_nothing_to_train_is_dropped_and_counted(tmp_path, gpt2_tokenizer):
    rows = [{"prompt": "a long prompt that fills the whole budget", "completion": " answer"},
            {"prompt": "short", "completion": " ok"}]
    data = prep(tmp_path, gpt2_tokenizer, rows, max_length=6, overlong="truncate")
    st = data.stats["train"]
    assert (st.kept, st.dropped["no_targets"], st.truncated) == (1, 1, 1)
    assert labels_of(data)[0] == enc(gpt2_tokenizer, "short ok") + [EOS]


def test_alpaca_columns_are_mapped_and_input_joins_the_prompt(tmp_path, gpt2_tokenizer):
    rows = [{"instruction": "Translate to French.", "input": "cat", "output": " chat"},
            {"instruction": "Say yes.", "input": "", "output": " yes"}]
    data = prep(tmp_path, gpt2_tokenizer, rows, columns=parse_columns("prompt=instruction,completion=output,input=input"))
    assert data.layout.format == "prompt_completion"
    ids, labels = labels_of(data, 0)
    p = enc(gpt2_tokenizer, "Translate to French.\n\ncat")
    assert ids == p + enc(gpt2_tokenizer, " chat") + [EOS]
    assert labels == [X] * len(p) + enc(gpt2_tokenizer, " chat") + [EOS]
    ids, _ = labels_of(data, 1)
    assert ids == enc(gpt2_tokenizer, "Say yes.") + enc(gpt2_tokenizer, " yes") + [EOS]  # empty input: no join


def test_column_mapping_errors_name_the_fix(tmp_path, gpt2_tokenizer):
    rows = [{"instruction": "x", "output": "y"}]
    with pytest.raises(SftuneError, match=r"column 'answer' \(for completion\) is not in the dataset .*--columns"):
        prep(tmp_path, gpt2_tokenizer, rows, columns={"prompt": "instruction", "completion": "answer"})
    with pytest.raises(SftuneError, match="unknown part 'reply'"):
        parse_columns("reply=output")
    with pytest.raises(SftuneError, match="format prompt_completion needs prompt .*--columns"):
        prep(tmp_path / "..", gpt2_tokenizer, [{"text": "a b c d e f g"}], format="prompt_completion")


# --- chat ------------------------------------------------------------------------------


CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Red."},
]}


def test_chat_trains_assistant_turns_with_their_end_of_turn(tmp_path, gpt2_tokenizer):
    data = prep(tmp_path, gpt2_tokenizer, [CHAT])
    assert data.layout.format == "chat"
    e = lambda s: enc(gpt2_tokenizer, s)  # noqa: E731
    # sftune's default template: <|role|>\n{content}<|endoftext|> per turn
    expected = [
        (e("<|system|>\nBe brief.") + [EOS], False),
        (e("<|user|>\nName a colour.") + [EOS], False),
        (e("<|assistant|>\n"), False),
        (e("Blue.") + [EOS], True),
        (e("<|user|>\nAnother?") + [EOS], False),
        (e("<|assistant|>\n"), False),
        (e("Red.") + [EOS], True),
    ]
    ids, labels = labels_of(data)
    assert ids == [t for part, _ in expected for t in part]
    assert labels == [t if trained else X for part, trained in expected for t in part]
    assert gpt2_tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE  # set, so it is saved with the model


def test_a_long_conversation_is_cut_after_its_last_whole_turn(tmp_path, gpt2_tokenizer, capsys):
    """--overlong truncate on chat data keeps whole turns: each answer kept ends with its end-of-turn marker."""
    ids, _ = labels_of(prep(tmp_path, gpt2_tokenizer, [CHAT]))
    first_answer_end = ids.index(EOS, ids.index(EOS, ids.index(EOS) + 1) + 1) + 1  # system, user, then Blue.<eos>
    (tmp_path / "cut").mkdir()
    data = prep(tmp_path / "cut", gpt2_tokenizer, [CHAT], max_length=len(ids) - 2, overlong="truncate")
    cut, labels = labels_of(data)
    assert cut == ids[:first_answer_end]  # the second exchange is left out, not cut inside its answer
    assert gpt2_tokenizer.decode([t for t, lab in zip(cut, labels) if lab != X]) == "Blue.<|endoftext|>"
    assert (data.stats["train"].turns_cut, data.stats["train"].truncated) == (1, 0)
    assert "end after their last whole turn that fits" in capsys.readouterr().err
    (tmp_path / "short").mkdir()  # not even the first answer fits: cut inside it, as before, and said so
    data = prep(tmp_path / "short", gpt2_tokenizer, [CHAT], max_length=first_answer_end - 1, overlong="truncate")
    assert labels_of(data)[0] == ids[: first_answer_end - 1]
    assert (data.stats["train"].turns_cut, data.stats["train"].truncated) == (0, 1)


def test_sharegpt_conversations_are_chat(tmp_path, gpt2_tokenizer):
    sharegpt = {"conversations": [{"from": "system" if m["role"] == "system" else "human" if m["role"] == "user"
                                   else "gpt", "value": m["content"]} for m in CHAT["messages"]]}
    chat = labels_of(prep(tmp_path, gpt2_tokenizer, [CHAT]))
    data = prepare(
        str(write_splits(tmp_path, [sharegpt], name="sharegpt")), gpt2_tokenizer, 128, min_tokens=0,
        cache_dir=tmp_path / "c2")
    assert data.layout == Layout("chat", {"messages": "conversations"})
    assert labels_of(data) == chat


def test_chat_train_on_all_turns(tmp_path, gpt2_tokenizer):
    data = prep(tmp_path, gpt2_tokenizer, [CHAT], train_on_all_turns=True)
    ids, labels = labels_of(data)
    header = enc(gpt2_tokenizer, "<|assistant|>\n")
    untrained = [i for i, lab in enumerate(labels) if lab == X]
    assert len(untrained) == 2 * len(header)  # only the assistant headers (the generation prompt) stay untrained
    assert labels[untrained[-1] + 1:] == enc(gpt2_tokenizer, "Red.") + [EOS]


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chat_with_a_template_whose_end_of_turn_is_not_eos(tmp_path, gpt2_tokenizer):
    tok = copy.deepcopy(gpt2_tokenizer)
    tok.chat_template = CHATML
    data = prep(tmp_path, tok, [CHAT])
    ids, labels = labels_of(data)
    trained_runs = tok.decode([i for i, lab in zip(ids, labels) if lab != X])
    assert trained_runs == "Blue.<|im_end|>\nRed.<|im_end|>\n"
    assert EOS not in ids  # the template writes no EOS, and sftune adds none to chat data
    rendered = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tok.decode(ids) == rendered  # the parts join to exactly what transformers renders


def test_chat_template_with_generation_blocks(tmp_path, gpt2_tokenizer):
    """TRL-style templates mark assistant text with {% generation %}: they render (and split) as usual."""
    tok = copy.deepcopy(gpt2_tokenizer)
    tok.chat_template = CHATML.replace("{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}", (
        "{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}"
        "{{ '\n' }}"))
    assert "generation" in tok.chat_template
    data = prep(tmp_path, tok, [CHAT])
    ids, labels = labels_of(data)
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != X]) == "Blue.<|im_end|>\nRed.<|im_end|>\n"
    assert tok.decode(ids) == tok.apply_chat_template(CHAT["messages"], tokenize=False)


def test_chat_prompt_completion_trains_the_completion_turns(tmp_path, gpt2_tokenizer):
    row = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello."}]}
    data = prep(tmp_path, gpt2_tokenizer, [row])
    assert data.layout.format == "chat_prompt_completion"
    ids, labels = labels_of(data)
    answer = enc(gpt2_tokenizer, "Hello.") + [EOS]
    assert labels == [X] * (len(ids) - len(answer)) + answer
    assert gpt2_tokenizer.decode(ids) == "<|user|>\nHi<|endoftext|><|assistant|>\nHello.<|endoftext|>"


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}], r"train row 2, message 1: unknown role 'bot'"),
    ([], r"train row 2: empty conversation"),
    ([{"role": "user", "content": "hi"}], r"train row 2: the conversation ends with a user turn"),
    ([{"role": "user"}], r"train row 2, message 0: expected \{role, content\}"),
])
def test_bad_conversations_name_the_row_and_message(tmp_path, gpt2_tokenizer, messages, message):
    rows = [CHAT, {"messages": messages}]
    with pytest.raises(SftuneError, match=message):
        prepare(str(write_splits(tmp_path, rows, [CHAT])), gpt2_tokenizer, 128, min_tokens=0,
                     cache_dir=tmp_path / "c")


def test_template_without_end_of_turn_is_warned_about(tmp_path, gpt2_tokenizer, capsys):
    tok = copy.deepcopy(gpt2_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    prep(tmp_path, tok, [CHAT])
    assert "writes no end-of-turn marker" in capsys.readouterr().err


def test_template_that_rewrites_earlier_turns_is_an_error(gpt2_tokenizer):
    # renders only the last message: no render is a prefix of the next
    template = ChatTemplate("{{ messages[-1]['content'] }}", gpt2_tokenizer)
    with pytest.raises(SftuneError, match="cannot be split into turns exactly"):
        row_segments(CHAT, Layout("chat", {"messages": "messages"}), template, where="train row 1")


# Hand-written templates with the properties of real families' templates (each checked against the family's own
# template by hand, NOTES try 48): a closing EOS after the last turn (Phi-3), a generation prompt that opens the
# turn with more than the rendered turn has (DeepSeek-R1's "<think>\n"), a refusal to render a conversation without
# a user turn (Qwen3.5), and earlier assistant turns written without their thinking (Qwen3, GLM-4.5, Nemotron).
CLOSING_EOS = CHATML.replace("{% endif %}", "{% else %}{{ eos_token }}{% endif %}")
THINK_PROMPT = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
NEEDS_A_USER = ("{% if messages and 'user' not in messages | map(attribute='role') | list %}"
                "{{ raise_exception('No user query found in messages.') }}{% endif %}" + CHATML)
DROPS_OLD_THINKING = (
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% set content = m['content'] %}"
    "{% if m['role'] == 'assistant' %}{% set thought = '' %}"
    "{% if '</think>' in content %}{% set thought = content.split('</think>')[0].split('<think>')[-1].strip() %}"
    "{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    "{% if loop.index0 > ns.last_user %}{% set content = '<think>' + thought + '</think>\n' + content %}{% endif %}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
THINKING = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>greet</think>\nHello."},
            {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes."}]


def split(template_source, tok, messages, **kw):
    template = ChatTemplate(template_source, tok)
    return row_segments({"messages": messages}, Layout("chat", {"messages": "messages"}), template, **kw)


def test_a_template_that_closes_the_conversation_keeps_its_closing_text_at_the_end(gpt2_tokenizer):
    parts = split(CLOSING_EOS, gpt2_tokenizer, CHAT["messages"])
    assert [t for t, trained in parts if trained] == ["Blue.<|im_end|>\n", "Red.<|im_end|>\n<|endoftext|>"]
    assert "".join(t for t, _ in parts) == ChatTemplate(CLOSING_EOS, gpt2_tokenizer).render(CHAT["messages"])


def test_a_closing_that_only_follows_an_assistant_turn_is_found_from_the_special_tokens(gpt2_tokenizer):
    # as TRL's Phi-3 training template: no closing for no message, so it is told apart by being special tokens only
    closing_after_answer = CHATML.replace(
        "{% endif %}", "{% elif messages and messages[-1]['role'] == 'assistant' %}{{ eos_token }}{% endif %}")
    template = ChatTemplate(closing_after_answer, gpt2_tokenizer)
    assert template.render_empty() == ""
    parts = split(closing_after_answer, gpt2_tokenizer, CHAT["messages"])
    assert [t for t, trained in parts if trained] == ["Blue.<|im_end|>\n", "Red.<|im_end|>\n<|endoftext|>"]
    assert "".join(t for t, _ in parts) == template.render(CHAT["messages"])


def test_a_generation_prompt_longer_than_the_rendered_header_trains_what_follows_the_common_part(gpt2_tokenizer):
    parts = split(THINK_PROMPT, gpt2_tokenizer, CHAT["messages"])
    assert [t for t, trained in parts if trained] == ["Blue.<|im_end|>\n", "Red.<|im_end|>\n"]
    # the header is the part of "<|im_start|>assistant\n<think>\n" the rendered turn opens with
    assert parts[-3:] == [("<|im_start|>user\nAnother?<|im_end|>\n", False), ("<|im_start|>assistant\n", False),
                          ("Red.<|im_end|>\n", True)]


def test_a_template_that_cannot_render_a_partial_conversation_is_split_where_it_can(gpt2_tokenizer):
    parts = split(NEEDS_A_USER, gpt2_tokenizer, CHAT["messages"])
    # the system turn alone cannot be rendered: it goes with the user turn, untrained
    assert parts[0] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n", False)
    assert [t for t, trained in parts if trained] == ["Blue.<|im_end|>\n", "Red.<|im_end|>\n"]
    with pytest.raises(SftuneError, match="rendering message 0 changes"):  # but a trained turn must have its own part
        split(NEEDS_A_USER, gpt2_tokenizer, CHAT["messages"], train_on_all_turns=True)


def test_earlier_assistant_turns_a_template_rewrites_are_trained_as_generated(tmp_path, gpt2_tokenizer, capsys):
    parts = split(DROPS_OLD_THINKING, gpt2_tokenizer, THINKING)
    assert parts == [
        ("<|im_start|>user\nHi<|im_end|>\n", False), ("<|im_start|>assistant\n", False),
        ("<think>greet</think>\nHello.<|im_end|>\n", True),  # with its thinking, as when it was the last turn
        ("<|im_start|>user\nAgain?<|im_end|>\n", False), ("<|im_start|>assistant\n", False),
        ("<think></think>\nYes.<|im_end|>\n", True)]
    template = ChatTemplate(DROPS_OLD_THINKING, gpt2_tokenizer)
    for i, part in ((1, 2), (3, 5)):  # each trained turn with its header: the template's render of it as the last
        assert template.render(THINKING[: i + 1]).endswith("".join(t for t, _ in parts[part - 1: part + 1]))
    assert "Hello.<|im_end|>" in template.render(THINKING) and "greet" not in template.render(THINKING)
    assert template.rewrites_earlier_turns() and not ChatTemplate(CHATML, gpt2_tokenizer).rewrites_earlier_turns()
    tok = copy.deepcopy(gpt2_tokenizer)
    tok.chat_template = DROPS_OLD_THINKING
    ids, labels = labels_of(prep(tmp_path, tok, [{"messages": THINKING}]))
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != X]) == "".join(t for t, trained in parts if trained)
    assert tok.decode(ids) == "".join(t for t, _ in parts)
    assert "each assistant turn is trained as the template writes it when it is the last one" in capsys.readouterr().err


def test_a_template_that_refuses_a_conversation_says_so(gpt2_tokenizer):
    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}" + CHATML)
    with pytest.raises(SftuneError, match=r"train row 1: the chat template refuses this conversation \(System role "
                                          r"not supported\); fix or remove the row, or use another template"):
        split(no_system, gpt2_tokenizer, CHAT["messages"], where="train row 1")


TOOLS_CHATML = (
    "{% if tools %}{{ '<|im_start|>system\nTools:' }}{% for t in tools %}{{ '\n' + (t | tojson) }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + (m['content'] or '') }}"
    "{% if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %}{{ '<tool_call>' + ({'name': c['function']"
    "['name'], 'arguments': c['function']['arguments']} | tojson) + '</tool_call>' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tool_row(tool, arguments, answer):
    schema = {"type": "function", "function": {"name": tool, "description": f"{tool}.", "parameters": {
        "type": "object", "properties": {k: {"type": "string"} for k in arguments}, "required": list(arguments)}}}
    call = {"type": "function", "function": {"name": tool, "arguments": arguments}}
    return {"messages": [{"role": "user", "content": f"Use {tool}."},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "name": tool, "content": "done"},
                         {"role": "assistant", "content": answer}], "tools": [schema]}


# rows whose tools and arguments have different keys: a table must not fill one row's keys into another's
TOOL_ROWS = [tool_row("get_weather", {"city": "Paris"}, "Sunny."), tool_row("search", {"query": "cats", "page": "2"},
                                                                             "Found."),
             {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]


def test_tool_calling_rows_train_the_calls_and_answers_with_the_rows_own_tools(tmp_path, gpt2_tokenizer):
    tok = copy.deepcopy(gpt2_tokenizer)
    tok.chat_template = TOOLS_CHATML
    data = prep(tmp_path, tok, TOOL_ROWS, max_length=512)
    assert data.layout == Layout("chat", {"messages": "messages", "tools": "tools"})
    examples = {tok.decode(ids): labels for ids, labels in (labels_of(data, i) for i in range(len(TOOL_ROWS)))}
    for i, row in enumerate(TOOL_ROWS):
        # each row is exactly what the model is given at inference, with no key of another row
        rendered = tok.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)
        labels = examples[rendered]
        trained = tok.decode([t for t, lab in zip(tok(rendered)["input_ids"], labels) if lab != X])
        if i < 2:
            call = row["messages"][1]["tool_calls"][0]["function"]
            assert trained == (f"<tool_call>{json.dumps({'name': call['name'], 'arguments': call['arguments']})}"
                               f"</tool_call><|im_end|>\n{row['messages'][3]['content']}<|im_end|>\n")
            assert "done" not in trained and "null" not in rendered  # the tool's answer is input, not trained
    as_text = [{**row, "tools": json.dumps(row["tools"])} for row in TOOL_ROWS[:2]]  # older datasets' JSON text
    (tmp_path / "text").mkdir()
    again = prep(tmp_path / "text", tok, as_text, max_length=512)
    assert sorted(map(str, (labels_of(again, i) for i in range(2)))) == \
        sorted(str(labels_of(data, i)) for i in range(3) if "Tools:" in tok.decode(labels_of(data, i)[0]))


def test_a_tokenizers_tool_use_template_renders_the_rows_with_tools(tmp_path, gpt2_tokenizer):
    """Tokenizers that name several templates (Hermes, Command R): rows with tools get `tool_use`, as in
    `apply_chat_template(..., tools=...)`; the others get `default`."""
    tok = copy.deepcopy(gpt2_tokenizer)
    tok.chat_template = {"default": CHATML.replace("m['content']", "(m['content'] or '')"), "tool_use": TOOLS_CHATML}
    data = prep(tmp_path, tok, TOOL_ROWS, max_length=512)
    texts = sorted(tok.decode(labels_of(data, i)[0]) for i in range(len(TOOL_ROWS)))
    assert texts == sorted(tok.apply_chat_template(r["messages"], tools=r.get("tools"), tokenize=False)
                           for r in TOOL_ROWS)
    assert sum("Tools:" in t for t in texts) == 2
    tok.chat_template = {"tool_use": TOOLS_CHATML, "rag": CHATML}
    with pytest.raises(SftuneError, match=r"names several chat templates \(tool_use, rag\) and none is 'default'; "
                                          r"give the one to train with: --chat-template FILE"):
        (tmp_path / "named").mkdir()
        prep(tmp_path / "named", tok, TOOL_ROWS, max_length=512)


def test_sftunes_default_template_writes_tools_and_tool_calls(gpt2_tokenizer):
    parts = row_segments(TOOL_ROWS[0], Layout("chat", {"messages": "messages", "tools": "tools"}),
                         ChatTemplate(DEFAULT_CHAT_TEMPLATE, gpt2_tokenizer))
    schema = json.dumps(TOOL_ROWS[0]["tools"][0])
    assert parts == [
        (f"<|tools|>\n{schema}<|endoftext|>", False), ("<|user|>\nUse get_weather.<|endoftext|>", False),
        ("<|assistant|>\n", False),
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|endoftext|>', True),
        ("<|tool|>\ndone<|endoftext|>", False), ("<|assistant|>\n", False), ("Sunny.<|endoftext|>", True)]


def test_sharegpt_tool_turns_read_as_tool_calls_and_answers(gpt2_tokenizer):
    """LLaMA-Factory's ShareGPT layout: function_call and observation turns, tools as JSON text."""
    row = TOOL_ROWS[1]
    call = row["messages"][1]["tool_calls"][0]["function"]
    sharegpt = {"conversations": [{"from": "human", "value": "Use search."},
                                  {"from": "function_call", "value": json.dumps(call)},
                                  {"from": "observation", "value": "done"}, {"from": "gpt", "value": "Found."}],
                "tools": json.dumps(row["tools"])}
    template = ChatTemplate(TOOLS_CHATML, gpt2_tokenizer)
    assert row_segments(sharegpt, Layout("chat", {"messages": "conversations", "tools": "tools"}), template) == \
        row_segments(row, Layout("chat", {"messages": "messages", "tools": "tools"}), template)
    sharegpt["conversations"][1]["value"] = "search(cats)"
    with pytest.raises(SftuneError, match="message 1: tool_calls must be a list"):
        row_segments(sharegpt, Layout("chat", {"messages": "conversations", "tools": "tools"}), template)


def test_a_template_that_drops_tool_calls_or_tools_is_an_error(gpt2_tokenizer):
    layout = Layout("chat", {"messages": "messages", "tools": "tools"})
    with pytest.raises(SftuneError, match=r"train row 1, message 1: the chat template does not write tool calls, "
                                          r"so the model would learn empty answers; use a template that does"):
        row_segments(TOOL_ROWS[0], layout, ChatTemplate(CHATML.replace("m['content']", "(m['content'] or '')"),
                                                       gpt2_tokenizer), where="train row 1")
    no_tools = TOOLS_CHATML[TOOLS_CHATML.index("{% for m in messages %}"):]
    with pytest.raises(SftuneError, match=r"train row 1: the chat template does not write the row's tools"):
        row_segments(TOOL_ROWS[0], layout, ChatTemplate(no_tools, gpt2_tokenizer), where="train row 1")
    bad = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": "f()"}]}
    with pytest.raises(SftuneError, match=r"train row 1, message 1: tool_calls must be a list"):
        row_segments(bad, layout, ChatTemplate(TOOLS_CHATML, gpt2_tokenizer), where="train row 1")
    with pytest.raises(SftuneError, match=r"train row 1: the tools column is text but not JSON"):
        row_segments({**TOOL_ROWS[0], "tools": "[{"}, layout, ChatTemplate(TOOLS_CHATML, gpt2_tokenizer),
                     where="train row 1")


def test_messages_keep_tool_and_reasoning_fields_and_lose_the_empty_ones():
    from sftune.data.formats import validate_messages

    messages = validate_messages([
        {"role": "user", "content": "Hi", "tool_calls": None, "name": None},  # keys a table filled in
        {"role": "assistant", "content": "Hello.", "reasoning": "greet back", "score": 1}], "row")
    assert messages == [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello.", "reasoning": "greet back",
                         "thinking": "greet back", "reasoning_content": "greet back"}]


def test_a_format_that_does_not_fit_the_data_says_what_does():
    """--format chat on text data names the chat mapping (it named a prompt/completion one); --format text on
    conversations says they are conversations (it said no string column holds the text); a text column beside
    them is still read."""
    from datasets import Value

    from sftune.data.formats import detect_layout

    s = Value("string")
    with pytest.raises(SftuneError, match="map them with --columns, e.g. --columns messages=conversation"):
        detect_layout({"text": s}, "chat")
    conversations = [{"role": s, "content": s}]
    with pytest.raises(SftuneError, match="--format text: the dataset holds conversations .column 'conversations'.*"
                                          "leave out --format"):
        detect_layout({"conversations": conversations}, "text")
    assert detect_layout({"messages": conversations, "text": s}, "text").columns == {"text": "text"}


def test_the_roles_other_names_read_as_the_roles(gpt2_tokenizer):
    """`model` (Gemini's and Gemma's name for the assistant), and ShareGPT's `human` and `gpt` written as roles, train
    exactly as `assistant` and `user` do; an unknown role is still refused, the aliases named."""
    layout, template = Layout("chat", {"messages": "messages"}), ChatTemplate(DEFAULT_CHAT_TEMPLATE, gpt2_tokenizer)
    aliased = {"messages": [{"role": "human", "content": "Hi"}, {"role": "model", "content": "Hello."},
                            {"role": "user", "content": "And?"}, {"role": "gpt", "content": "Bye."}]}
    plain = {"messages": [{**m, "role": {"human": "user", "model": "assistant", "gpt": "assistant"}.get(m["role"],
                                                                                                     m["role"])}
                          for m in aliased["messages"]]}
    assert row_segments(aliased, layout, template) == row_segments(plain, layout, template)
    with pytest.raises(SftuneError, match=r"unknown role 'bot'; roles are system, user, assistant, tool \(and model "
                                          r"for assistant, gpt for assistant, human for user\)"):
        row_segments({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}, layout,
                     template)


def test_a_conversation_stored_as_json_text_reads_as_its_messages(gpt2_tokenizer):
    layout, template = Layout("chat", {"messages": "messages"}), ChatTemplate(DEFAULT_CHAT_TEMPLATE, gpt2_tokenizer)
    assert row_segments({"messages": json.dumps(CHAT["messages"])}, layout, template) == \
        row_segments(CHAT, layout, template)
    with pytest.raises(SftuneError, match="row: column 'messages' holds text that is not a JSON list of messages"):
        row_segments({"messages": "Hi there"}, layout, template)


def test_content_given_as_text_blocks_is_the_text_they_hold(gpt2_tokenizer):
    layout, template = Layout("chat", {"messages": "messages"}), ChatTemplate(DEFAULT_CHAT_TEMPLATE, gpt2_tokenizer)
    blocks = [{**m, "content": [{"type": "text", "text": m["content"][:3]}, {"type": "text", "text": m["content"][3:]}]}
              for m in CHAT["messages"]]
    assert row_segments({"messages": blocks}, layout, template) == row_segments(CHAT, layout, template)
    blocks[1]["content"].append({"type": "image", "url": "cat.png"})
    with pytest.raises(SftuneError, match="row, message 1: content block 'image' is not text; sftune trains"):
        row_segments({"messages": blocks}, layout, template)


def test_an_assistant_turn_of_weight_0_is_shown_but_not_trained(tmp_path, gpt2_tokenizer):
    """OpenAI's fine-tuning format: `"weight": 0` on an assistant message leaves that turn out of the loss."""
    messages = [dict(m) for m in CHAT["messages"]]
    messages[2]["weight"] = 0
    messages[4]["weight"] = 1
    for options in ({}, {"train_on_all_turns": True}):
        parts = row_segments({"messages": messages}, Layout("chat", {"messages": "messages"}),
                             ChatTemplate(DEFAULT_CHAT_TEMPLATE, gpt2_tokenizer), **options)
        assert ("Blue.<|endoftext|>", False) in parts and ("Red.<|endoftext|>", True) in parts
    ids, labels = labels_of(prep(tmp_path, gpt2_tokenizer, [{"messages": messages}]))
    assert gpt2_tokenizer.decode([t for t, lab in zip(ids, labels) if lab != X]) == "Red.<|endoftext|>"
    for k, weight in ((2, 0.5), (1, 0)):
        bad = [dict(m) for m in CHAT["messages"]]
        bad[k]["weight"] = weight
        with pytest.raises(SftuneError, match=rf"row, message {k}: weight {weight} on a \w+ message; weight is 0"):
            row_segments({"messages": bad}, Layout("chat", {"messages": "messages"}),
                         ChatTemplate(DEFAULT_CHAT_TEMPLATE, gpt2_tokenizer))


def test_detection_from_columns():
    from datasets import List, Value

    s = Value("string")
    msg = List({"role": s, "content": s})
    assert detect_layout({"text": s}).format == "text"
    assert detect_layout({"prompt": s, "completion": s}).format == "prompt_completion"
    assert detect_layout({"messages": msg}).format == "chat"
    assert detect_layout({"prompt": msg, "completion": msg}).format == "chat_prompt_completion"
    assert detect_layout({"conversation": msg}, columns={"messages": "conversation"}).format == "chat"
    assert detect_layout({"prompt": s, "completion": s}, "text", text_column="completion").columns == {"text": "completion"}
    # a part the format does not use is a mistake (half a prompt/completion pair; a chat's input), not ignored
    for features, columns, words in (({"text": s}, {"prompt": "text"}, "--columns prompt=text: format text does not "
                                      "use prompt (its parts: text)"),
                                     ({"messages": msg}, {"input": "messages"}, "format chat does not use input")):
        with pytest.raises(SftuneError, match=re.escape(words)):
            detect_layout(features, columns=columns)


# --- masks survive batching --------------------------------------------------------------


def test_packing_and_token_batching_keep_the_masks(tmp_path, gpt2_tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"Count to {n}"},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(1, n + 1))}]}
            for n in range(1, 13)]
    data = prep(tmp_path, gpt2_tokenizer, rows)
    ex = data.train
    separate = {i: labels_of(data, i)[1] for i in range(len(ex))}
    # packed rows: each example's labels appear unchanged (its first token is untrained anyway)
    packed_rows = best_fit_decreasing(ex.lengths, 96)
    assert len(packed_rows) < len(ex)
    batch = collate_packed(ex, packed_rows, EOS)
    for r, row in enumerate(packed_rows):
        at = 0
        for i in row:
            n = int(ex.lengths[i])
            assert batch["labels"][r, at:at + n].tolist() == separate[i]
            at += n
    # token-budget batches: every example's labels, followed only by untrained padding
    for step in epoch_steps(ex.lengths, 4, 1, seed=0, epoch=0, batch_tokens=120):
        for micro in step:
            b = collate(ex, micro, EOS)
            assert b["input_ids"].numel() <= 120
            for row, i in enumerate(micro):
                n = len(separate[i])
                assert b["labels"][row, :n].tolist() == separate[i]
                assert (b["labels"][row, n:] == X).all()


# --- file types ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_prompt_completion_from_each_file_type(tmp_path, gpt2_tokenizer, suffix):
    import pandas as pd

    rows = [{"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}"} for i in range(20)]
    df = pd.DataFrame(rows)
    path = tmp_path / f"qa{suffix}"
    {".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".json": lambda: path.write_text(json.dumps(rows)),
     ".csv": lambda: df.to_csv(path, index=False),
     ".tsv": lambda: df.to_csv(path, index=False, sep="\t"),
     ".parquet": lambda: df.to_parquet(path)}[suffix]()
    data = prepare(str(path), gpt2_tokenizer, 64, min_tokens=0, val_fraction=0.25, cache_dir=tmp_path / "c")
    assert data.layout.format == "prompt_completion"
    assert len(data.train) + len(data.validation) == 20
    assert data.stats["train"].supervised_tokens == 2 * len(data.train)  # one number token + EOS each


def test_several_files_and_globs(tmp_path, gpt2_tokenizer):
    for k in range(3):
        (tmp_path / f"part{k}.jsonl").write_text("".join(
            json.dumps({"text": f"file {k} sentence number {i} is here"}) + "\n" for i in range(10)))
    by_glob = prepare(str(tmp_path / "part*.jsonl"), gpt2_tokenizer, 64, val_fraction=0.2, cache_dir=tmp_path / "c")
    by_list = prepare(f"{tmp_path / 'part0.jsonl'},{tmp_path / 'part2.jsonl'}", gpt2_tokenizer, 64,
                           val_fraction=0.2, cache_dir=tmp_path / "c")
    assert len(by_glob.train) + len(by_glob.validation) == 30
    assert len(by_list.train) + len(by_list.validation) == 20
    with pytest.raises(SftuneError, match="no file matches"):
        prepare(str(tmp_path / "nothing*.jsonl"), gpt2_tokenizer, 64, cache_dir=tmp_path / "c")


def test_split_chooses_the_training_split(tmp_path, gpt2_tokenizer):
    d = tmp_path / "splits"
    d.mkdir()
    for split, n in (("train", 5), ("test", 7), ("validation", 3)):
        (d / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"{split} row {i} of some text"}) + "\n"
                                                  for i in range(n)))
    data = prepare(str(d), gpt2_tokenizer, 64, min_tokens=0, split="test", cache_dir=tmp_path / "c")
    assert (len(data.train), len(data.validation)) == (7, 3)
    with pytest.raises(SftuneError, match=r"has no 'dev2' split \(it has: .*\); set --split"):
        prepare(str(d), gpt2_tokenizer, 64, split="dev2", cache_dir=tmp_path / "c")


def test_show_marks_trained_runs_with_brackets_or_colour(gpt2_tokenizer):
    from sftune.report import marked_text

    ids = enc(gpt2_tokenizer, "Q: hi\nA:") + enc(gpt2_tokenizer, " yo") + [EOS]
    n = len(ids) - 2
    labels = [X] * n + ids[n:]
    assert marked_text(gpt2_tokenizer, ids, labels) == "Q: hi\nA:[[ yo<|endoftext|>]]"
    assert marked_text(gpt2_tokenizer, ids, labels, color=True) == "Q: hi\nA:\x1b[1;32m yo<|endoftext|>\x1b[0m"


@pytest.fixture
def bos_tokenizer(gpt2_tokenizer):
    """GPT-2's BPE with a BOS added before every text, as Llama-style tokenizers do (BOS = id 50256 here)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(gpt2_tokenizer.backend_tokenizer)
    backend.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", EOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    assert tok("hi")["input_ids"] == [EOS] + tok("hi", add_special_tokens=False)["input_ids"]
    return tok


def test_bos_goes_first_untrained_and_is_never_doubled(tmp_path, bos_tokenizer):
    row = {"prompt": "Q: hi\nA:", "completion": " yo"}
    data = prep(tmp_path, bos_tokenizer, [row])
    p, c = enc(bos_tokenizer, row["prompt"]), enc(bos_tokenizer, row["completion"])
    assert labels_of(data) == ([EOS] + p + c + [EOS], [X] * (1 + len(p)) + c + [EOS])

    # a chat template writes its own BOS: the parts are tokenized without special tokens, so there is one BOS
    bos_tokenizer.chat_template = "{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE
    data = prepare(str(write_splits(tmp_path, [CHAT], name="chat")), bos_tokenizer, 128, min_tokens=0,
                        cache_dir=tmp_path / "c2")
    ids, labels = labels_of(data)
    assert ids[0] == EOS and ids[1] != EOS and labels[0] == X
    assert bos_tokenizer.decode(ids) == bos_tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)


TEXTS = ["the film is", " a clever , tender sequel", "", "  two  spaces\n\nand lines\t", "café naïve 日本語 🎬",
         "ends with<|endoftext|>and on", "<|endoftext|>", "x" * 300]


def test_the_direct_encoder_gives_what_transformers_gives(gpt2_tokenizer, bos_tokenizer):
    """`text_encoder` calls the Rust tokenizer itself (NOTES try 87): the ids must be transformers' ids, also for a
    BOS-adding tokenizer, added tokens, `split_special_tokens`, and an encoder left truncating and padding by its
    tokenizer.json or by an earlier call."""
    from sftune.data.tokenize import text_encoder
    from sftune.vocab import add_tokens

    grown = copy.deepcopy(gpt2_tokenizer)
    add_tokens(grown, ["<|tool|>"])
    split = copy.deepcopy(gpt2_tokenizer)
    split.split_special_tokens = True
    texts = TEXTS + ["a <|tool|> call"]
    for tok in (gpt2_tokenizer, bos_tokenizer, grown, split):
        encode = text_encoder(tok)
        assert encode.__name__ == "encode"  # the direct path, not the fallback
        assert encode(texts) == tok(texts, add_special_tokens=False)["input_ids"]
    left = copy.deepcopy(gpt2_tokenizer)
    left.backend_tokenizer.enable_truncation(3)
    left.backend_tokenizer.enable_padding(length=400)
    encode = text_encoder(left)
    want = gpt2_tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert encode(texts) == want and encode(texts) == want  # (the first call through transformers, then direct)
    assert left.backend_tokenizer.truncation is None and encode(["x" * 300]) == want[7:8]
