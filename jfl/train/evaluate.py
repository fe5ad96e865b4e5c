"""The eval hook of the training loop: sample images for fixed prompts, answer fixed questions.

`Evaluator(...)(step, params, vae_params)` is called every `config.eval.every` steps with the EMA
params. It writes `<out_dir>/samples_<step>.png` (a grid, one image per prompt, when the model has
a VAE or pixel codec) and `<out_dir>/answers_<step>.txt`. One pipeline serves every call (only its
params change), so nothing recompiles between evaluations. Without a tokenizer
(`config.data.tokenizer`) it logs why and does nothing. Failures are logged, never raised:
evaluation must not stop a training run.
"""

import logging
import os

from jfl.config_utils import split_list

log = logging.getLogger("jfl.train")


class Evaluator:
  """Samples and answers with the params it is called with (the model part of the EMA).

  config.eval: prompts ("a;b"), questions ("image_path|question;..."), num_steps, cfg_weight,
  max_new_tokens.
  """

  def __init__(self, config, model_config, tokenizer, out_dir: str):
    self.config, self.model_config, self.tokenizer, self.out_dir = config, model_config, tokenizer, out_dir
    self.pipe = None

  def __call__(self, step: int, params: dict, vae_params) -> dict | None:
    """Returns {"images": grid path or None, "answers": [...]}, or None when skipped or failed."""
    if self.tokenizer is None:
      log.info("eval at step %d skipped: no tokenizer (set --config.data.tokenizer=DIR)", step)
      return None
    try:
      return self._run(step, params, vae_params)
    except Exception as err:  # pylint: disable=broad-except
      log.warning("eval at step %d failed: %s: %s", step, type(err).__name__, err)
      return None

  def _run(self, step: int, params: dict, vae_params) -> dict:
    from jfl import chat, pipeline  # pylint: disable=g-import-not-at-top
    from jfl.cli.generate import make_grid  # pylint: disable=g-import-not-at-top
    e = self.config.eval
    if self.pipe is None:
      self.pipe = pipeline.JanusFlowPipeline(self.model_config, params, vae_params or None, self.tokenizer,
                                             dtype=self.config.compute_dtype)
    pipe = self.pipe
    pipe.params = params
    out = {"images": None, "answers": []}
    os.makedirs(self.out_dir, exist_ok=True)
    prompts = split_list(e.prompts)
    if prompts and pipe.vae_params is not None:
      images = pipe.generate(prompts, seed=0, num_steps=e.num_steps, cfg_weight=e.cfg_weight)
      out["images"] = os.path.join(self.out_dir, f"samples_{step:08d}.png")
      make_grid(images).save(out["images"])
    questions = [q.split("|", 1) for q in split_list(e.questions)]
    if questions:
      convs = [chat.conversation(path.strip(), q.strip()) for path, q in questions]
      out["answers"] = pipe.chat_batch(convs, max_new_tokens=e.max_new_tokens)
      with open(os.path.join(self.out_dir, f"answers_{step:08d}.txt"), "w") as f:
        for (path, q), a in zip(questions, out["answers"]):
          f.write(f"[{path.strip()}] {q.strip()}\n-> {a}\n\n")
    return out
