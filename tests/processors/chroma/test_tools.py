"""Tool calls in the thinker's stream: described in its system text, held back from the backbone."""

import json

import pytest
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema

from processors.chroma.generation import ThinkerToken
from processors.chroma.text import ByteTokenizer
from processors.chroma.tools import (
    ToolCallFilter,
    parse_call,
    tool_call_text,
    tool_response_text,
    tools_system_text,
)

IM_END = 300
BYTES = ByteTokenizer({"im_end": IM_END})


class WordTokenizer:
    """Tokens of a few characters each, cut at fixed places, so tags split in odd spots."""

    def __init__(self, width):
        self.width, self.pieces = width, {}

    def encode(self, text):
        ids = []
        for i in range(0, len(text), self.width):
            piece = text[i : i + self.width]
            ids.append(self.pieces.setdefault(piece, len(self.pieces) + 1000))
        return ids

    def decode(self, ids):
        by_id = {v: k for k, v in self.pieces.items()}
        return "".join(by_id.get(i, "") for i in ids)


def tokens(ids):
    return [ThinkerToken(i, None, None) for i in ids]


def run_filter(tokenizer, text, end=True):
    calls = []
    f = ToolCallFilter(tokenizer.decode, on_call=calls.append, special_ids=[IM_END])
    spoken = []
    for t in tokens(tokenizer.encode(text) + ([IM_END] if end else [])):
        spoken += f.push(t)
    spoken += f.finish()
    return [t.token_id for t in spoken], calls, f


def test_the_tools_are_described_in_the_system_text_as_json():
    schema = ToolsSchema(
        standard_tools=[
            FunctionSchema(
                name="lookup_order",
                description="Look up an order.",
                properties={"order_id": {"type": "string"}},
                required=["order_id"],
            )
        ]
    )
    text = tools_system_text(schema)
    listed = text.split("<tools>\n")[1].split("\n</tools>")[0]
    function = json.loads(listed)["function"]
    assert function["name"] == "lookup_order"
    assert function["parameters"]["required"] == ["order_id"]
    assert "<tool_call>" in text and "</tool_call>" in text
    assert tools_system_text(ToolsSchema(standard_tools=[])) == ""


@pytest.mark.parametrize("tokenizer", [BYTES, WordTokenizer(1), WordTokenizer(3), WordTokenizer(5), WordTokenizer(7)])
def test_a_call_is_held_back_and_the_text_around_it_is_spoken(tokenizer):
    before, after = "Let me check that. ", " Here it is."
    text = before + tool_call_text("lookup_order", {"order_id": "A17"}) + after
    spoken, calls, f = run_filter(tokenizer, text)
    said = tokenizer.decode(spoken)
    assert "tool_call" not in said and "order_id" not in said and "<" not in said
    assert said.startswith(before[: len(before) - 7])  # a token straddling the tag goes with the call
    assert said.endswith(after[7:])
    assert [(c.name, c.arguments) for c in calls] == [("lookup_order", {"order_id": "A17"})]
    assert spoken[-1] == IM_END
    assert "lookup_order" in tokenizer.decode(f.call_tokens[0])


def test_with_byte_tokens_exactly_the_text_outside_the_call_is_spoken():
    text = "One moment." + tool_call_text("f", {"x": "é"}) + "Done, café."
    spoken, calls, _ = run_filter(BYTES, text)
    assert BYTES.decode(spoken) == "One moment.Done, café."
    assert calls[0].arguments == {"x": "é"}


def test_text_that_only_looks_like_a_tag_is_spoken():
    text = "Type <tool or <b> or a < b, then </tool_call> alone."
    spoken, calls, _ = run_filter(BYTES, text)
    assert BYTES.decode(spoken) == text
    assert calls == []


def test_a_held_partial_tag_is_released_at_the_end_of_the_reply():
    spoken, calls, _ = run_filter(BYTES, "Goodbye <tool_ca", end=False)
    assert BYTES.decode(spoken) == "Goodbye <tool_ca"
    assert calls == []


def test_bad_json_is_dropped_never_spoken_and_logged(caplog):
    from loguru import logger

    messages = []
    handle = logger.add(messages.append, level="WARNING")
    try:
        spoken, calls, _ = run_filter(BYTES, "Hi. <tool_call>{not json}</tool_call> Bye.")
    finally:
        logger.remove(handle)
    assert BYTES.decode(spoken) == "Hi.  Bye."
    assert calls == []
    assert any("not JSON" in str(m) for m in messages)


def test_a_reply_that_ends_inside_a_call_speaks_none_of_it_but_still_ends():
    spoken, calls, _ = run_filter(BYTES, 'Ok. <tool_call>{"name": "f", "argu')
    assert BYTES.decode(spoken) == "Ok. "
    assert spoken[-1] == IM_END
    assert calls == []


def test_two_calls_in_one_reply():
    text = tool_call_text("a", {}) + "and" + tool_call_text("b", {"n": 2})
    spoken, calls, _ = run_filter(BYTES, text)
    assert BYTES.decode(spoken) == "and"
    assert [c.name for c in calls] == ["a", "b"]
    assert calls[0].call_id != calls[1].call_id


def test_parse_call_accepts_arguments_as_a_json_string_and_rejects_what_is_not_a_call():
    assert parse_call('{"name": "f", "arguments": "{\\"a\\": 1}"}').arguments == {"a": 1}
    assert parse_call('{"name": "f"}').arguments == {}
    assert parse_call('{"arguments": {}}') is None
    assert parse_call('{"name": "f", "arguments": [1]}') is None
    assert parse_call("[]") is None


def test_a_result_is_given_back_as_a_tool_response():
    assert tool_response_text({"status": "shipped"}) == '<tool_response>\n{"status": "shipped"}\n</tool_response>'
    assert tool_response_text("plain") == "<tool_response>\nplain\n</tool_response>"
