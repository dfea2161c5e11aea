"""From rows to tensors: TRL's prompt-completion and conversational formats rendered with the
tokenizer's chat template, the trained tokens marked, batches right-padded."""
import warnings

import torch
from torch.nn.utils.rnn import pad_sequence

from .errors import DataError

__all__ = ["render", "prompt_ids", "split", "encode", "collate"]


def render(tok, messages, add_generation_prompt: bool) -> str:
    """A conversation as text: through the chat template, or plain ``role: content`` lines."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)  # no template: plain lines
    return text + ("assistant: " if add_generation_prompt else "")


def prompt_ids(tok, prompt) -> list:
    """Token ids of a prompt: a string (with special tokens, e.g. BOS) or chat messages."""
    if isinstance(prompt, str):
        return tok(prompt, add_special_tokens=True)["input_ids"]
    return tok(render(tok, prompt, True), add_special_tokens=False)["input_ids"]


def split(tok, row, all_turns: bool = False):
    """(prompt ids, completion ids, completion mask) of one row in TRL's formats: prompt and
    completion strings (EOS appended) or message lists, or ``messages`` whose last assistant turn is
    the completion (with ``all_turns``: every assistant turn, TRL's ``assistant_only_loss``)."""
    if row.get("messages") is not None and all_turns:
        return split_turns(tok, row["messages"])
    if row.get("messages") is not None:
        prompt, completion = row["messages"][:-1], row["messages"][-1:]
    else:
        prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        ids = tok(completion, add_special_tokens=False)["input_ids"]
        ids = ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        return prompt_ids(tok, prompt), ids, [1] * len(ids)
    head = render(tok, prompt, add_generation_prompt=True)
    full = render(tok, list(prompt) + list(completion), add_generation_prompt=False)
    if not full.startswith(head):
        raise DataError("the chat template renders the conversation so that the prompt is not "
                        "a prefix of it")
    ids = tok(full[len(head):], add_special_tokens=False)["input_ids"]
    return tok(head, add_special_tokens=False)["input_ids"], ids, [1] * len(ids)


def split_turns(tok, messages):
    """Every assistant turn trained on: the conversation rendered and tokenised turn by turn."""
    pieces, done = [], ""  # (text, is_assistant) in order; `done` = text rendered so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = render(tok, messages[:i], add_generation_prompt=True)
        upto = render(tok, messages[:i + 1], add_generation_prompt=False)
        if not (head.startswith(done) and upto.startswith(head)):
            raise DataError(f"the chat template renders the conversation so that the text "
                            f"before assistant turn {i} is not a prefix of it")
        pieces += [(head[len(done):], False), (upto[len(head):], True)]
        done = upto
    ids, mask = [], []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        mask += [int(trained)] * len(piece)
    first = mask.index(1) if 1 in mask else len(ids)
    return ids[:first], ids[first:], mask[first:]


def encode(tok, rows, max_length: int, all_assistant_turns: bool = False) -> list:
    """Rows in TRL's formats (``split``) -> examples ``{"input_ids", "completion_mask"}`` (1 on
    trained tokens). Sequences longer than ``max_length`` lose their end; rows left with no trained
    token are all reported in one ``DataError``."""
    examples, problems, cut = [], [], 0
    for i, row in enumerate(rows, start=1):
        try:
            prompt, completion, trained = split(tok, row, all_assistant_turns)
        except DataError as e:
            problems.append(f"row {i}: {e}")
            continue
        if not prompt:
            problems.append(f"row {i}: the prompt encodes to no token")
        elif not completion:
            problems.append(f"row {i}: the completion encodes to no token")
        elif len(prompt) >= max_length:
            problems.append(f"row {i}: completion truncated away (prompt has {len(prompt)} "
                            f"tokens, max_length is {max_length})")
        else:
            keep = min(len(completion), max_length - len(prompt))
            cut += keep < len(completion)
            examples.append({"input_ids": prompt + completion[:keep],
                             "completion_mask": [0] * len(prompt) + trained[:keep]})
    if problems:
        raise DataError.listing(f"{len(problems)} row(s) cannot be trained on", problems)
    if cut:
        warnings.warn(f"{cut} of {len(examples)} completions were shortened to "
                      f"max_length={max_length}")
    return examples


def collate(tok, examples, device) -> dict:
    """Right-pad a list of examples into tensors on the model's device."""
    ids = [torch.tensor(e["input_ids"]) for e in examples]
    batch = {"input_ids": pad_sequence(ids, batch_first=True, padding_value=tok.pad_token_id),
             "attention_mask": pad_sequence([torch.ones_like(i) for i in ids], batch_first=True),
             "completion_mask": pad_sequence([torch.tensor(e["completion_mask"]) for e in examples],
                                             batch_first=True)}
    return {k: v.to(device) for k, v in batch.items()}
