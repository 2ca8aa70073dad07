"""Turn-by-turn template text equals the model's chat template applied to the whole conversation."""

from __future__ import annotations

import pytest

from model.stepper import SinkModel
from pipeline.dialogue import ChatTurns, Conversation, GenerationSettings, TemplateError


def test_pieces_of_the_smollm2_template(chat_tokenizer):
    turns = ChatTurns.from_tokenizer(chat_tokenizer)
    assert turns.end_of_turn_id == chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert turns.reply_suffix == "<|im_end|>\n"
    assert turns.user_text("hi", first=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert turns.closing_ids(stopped_on_end=True) == chat_tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert turns.closing_ids(stopped_on_end=False)[0] == turns.end_of_turn_id


@pytest.mark.parametrize("system", [None, "You answer in one word."])
@pytest.mark.parametrize("max_reply", [3, 200])  # cut at the limit / ended by the end-of-turn token
def test_fed_tokens_render_the_whole_conversation(tiny_chat_lm, terse_chat_lm, chat_tokenizer, system, max_reply):
    """Everything fed into the cache, decoded, is the chat template of the conversation so far."""
    lm = tiny_chat_lm if max_reply == 3 else terse_chat_lm
    model = SinkModel(lm)
    fed: list[int] = []
    step = model.step
    model.step = lambda cache, ids: (fed.extend(int(i) for i in ids), step(cache, ids))[1]  # record every token
    conv = Conversation(
        model, model.new_cache(sinks=4, window=64), GenerationSettings(max_reply_tokens=max_reply, system_prompt=system)
    )
    messages = [] if system is None else [{"role": "system", "content": system}]
    for user in ["Hello there.", "How are you?", "Bye!"]:
        reply = conv.turn(user)
        messages.append({"role": "user", "content": user})
        rendered = chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the cache holds the prompt and the reply except its last token, which is pending
        prompt_part = chat_tokenizer.decode(fed[: len(fed) - (len(reply.token_ids) - 1)], skip_special_tokens=False)
        assert prompt_part == rendered
        content = reply.token_ids[:-1] if reply.stopped == "end_of_turn" else reply.token_ids
        assert reply.text == chat_tokenizer.decode(content, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": chat_tokenizer.decode(content, skip_special_tokens=False)})
    assert conv.state.turns == 3


def test_tokenizer_without_template_is_refused(chat_tokenizer):
    class NoTemplate:
        chat_template = None

    with pytest.raises(TemplateError, match="chat template"):
        ChatTurns.from_tokenizer(NoTemplate())
