"""A character-level tokenizer for the toy world and the tests, a real Hugging Face tokenizer that
``AutoTokenizer`` saves and reloads, with an optional ChatML chat template."""
__all__ = ["char_tokenizer", "CHATML_TEMPLATE"]

CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                   "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer(alphabet: str, chat_template: str | None = None):
    """One token per character of ``alphabet``, the specials and the ChatML markers; others map to
    ``<unk>``. ``chat_template="chatml"`` attaches ChatML (its role names join the alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]
    if chat_template is not None:
        alphabet += "systemuserassistant\n"
    chars = sorted(set(alphabet))
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>", unk_token="<unk>",
                                  additional_special_tokens=specials[4:])
    if chat_template is not None:
        tok.chat_template = CHATML_TEMPLATE if chat_template == "chatml" else chat_template
    return tok
