"""The DeepSeek tokenizer, its special tokens and the deepseek SFT chat template (reference doc §4)."""

import dataclasses
import os

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE = "<image_placeholder>"
BOI = "<begin_of_image>"
EOI = "<end_of_image>"
UNK = "<unk>"

UNDERSTANDING_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  bos: int
  eos: int
  pad: int
  image: int
  boi: int
  eoi: int


def load_tokenizer(model_dir: str):
  """`transformers.AutoTokenizer` from a model directory; a clear error if it holds none."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
  if not any(os.path.isfile(os.path.join(model_dir, n)) for n in names):
    raise ValueError(f"{model_dir}: no tokenizer ({', '.join(names)}); text prompts need one")
  tok = AutoTokenizer.from_pretrained(model_dir)
  if tok.pad_token is None:
    tok.pad_token = PAD
  return tok


def special_ids(tokenizer) -> SpecialIds:
  """Ids of the special tokens, resolved by name (never hard-coded)."""
  ids = {}
  for field, text in (("bos", BOS), ("eos", EOS), ("pad", PAD), ("image", IMAGE), ("boi", BOI), ("eoi", EOI)):
    i = tokenizer.convert_tokens_to_ids(text)
    if i is None or i == tokenizer.unk_token_id:
      raise ValueError(f"tokenizer has no special token {text!r}")
    ids[field] = int(i)
  return SpecialIds(**ids)


def sft_prompt(messages: list[dict[str, str]], system: str = "") -> str:
  """The deepseek SFT template. `messages` are {"role": ..., "content": ...}; roles come from them.

  "{system}\\n\\n" + per turn "{role}: {content}" + "\\n\\n" after even turns / EOS after odd turns,
  "{role}:" for an empty (open) turn; the whole prompt is stripped.
  """
  text = f"{system}\n\n" if system else ""
  for i, m in enumerate(messages):
    content = m["content"].strip()
    text += f"{m['role']}: {content}" + ("\n\n" if i % 2 == 0 else EOS) if content else f"{m['role']}:"
  return text.strip()


def understanding_prompt(question: str, answer: str = "") -> str:
  """One image + question with the understanding system prompt; `answer` closes the turn with EOS."""
  return sft_prompt([{"role": "User", "content": f"{IMAGE}\n{question}"}, {"role": "Assistant", "content": answer}],
                    UNDERSTANDING_SYSTEM_PROMPT)


def generation_prompt(prompt: str) -> str:
  """Text-to-image prompt with the empty system prompt; callers append <begin_of_image> (§6)."""
  return sft_prompt([{"role": "User", "content": prompt}, {"role": "Assistant", "content": ""}])
